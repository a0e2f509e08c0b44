"""The engine registry and the worker's two-stage flags: each engine's flags parsed by its own parser (one
owner, one default, one env twin), a stand-in engine added the documented way, bad values as one-line errors,
the optional abilities wired into the runtime, and multi-node followers run headless."""

from __future__ import annotations

import argparse
import subprocess
import sys

import msgspec
import pytest

from dynamo_rt.config import Parser
from dynamo_rt.discovery import Registry
from dynamo_rt.errors import ConfigError
from dynamo_rt.local.services import EtcdServer, NatsServer
from dynamo_rt.local.tinymodel import ensure_tiny_model
from dynamo_rt.protocol import Data, GenerateRequest, InstanceRecord, Mode, StopConditions, encode
from dynamo_rt.transport import NatsOptions, Transport, instance_subject
from tests.conftest import arun
from tests.stack import ROOT
from tests.workers import standin_engine
from workers import registry
from workers.common.runtime import COMPONENT, WorkerRuntime
from workers.main import build_engines, build_parser, check_args, parse_args


@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch) -> str:
    """The stand-in engine, registered as a new engine is: one line in the registry's mapping."""
    monkeypatch.setitem(registry.ENGINES, "standin", standin_engine.MODULE)
    return "standin"


def _stderr_of_failed_parse(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv, env={})
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_mocker_has_its_own_defaults_and_env_twins() -> None:
    """The issue's bug: the mocker's --max-num-seqs (256) and DYN_MOCKER_* twins lost to the reference engine's."""
    args = parse_args(["--engine", "mocker"], env={})
    assert (args.max_num_seqs, args.block_size) == (256, 16)
    args = parse_args(["--engine", "mocker"], env={"DYN_MOCKER_MAX_NUM_SEQS": "7"})
    assert args.max_num_seqs == 7
    other_engines = {"DYN_MAX_NUM_SEQS": "5", "DYN_BLOCK_SIZE": "64"}
    args = parse_args(["--engine", "mocker"], env={"DYN_MOCKER_BLOCK_SIZE": "32", **other_engines})
    assert (args.max_num_seqs, args.block_size) == (256, 32)
    engines = build_engines(args, ensure_tiny_model())
    assert [(e.max_num_seqs, e.block_size, e.info.block_size) for e in engines] == [(256, 32, 32)]  # type: ignore[attr-defined]
    assert parse_args(["--engine", "mocker", "--max-num-seqs", "9"], env={"DYN_MOCKER_MAX_NUM_SEQS": "7"}
                      ).max_num_seqs == 9


def test_reference_keeps_its_defaults_and_env_twins() -> None:
    args = parse_args(["--engine", "reference"], env={})
    assert (args.max_num_seqs, args.block_size) == (128, 16)
    args = parse_args([], env={"DYN_MAX_NUM_SEQS": "9", "DYN_BLOCK_SIZE": "32", "DYN_MOCKER_MAX_NUM_SEQS": "7"})
    assert (args.engine, args.max_num_seqs, args.block_size) == ("reference", 9, 32)
    for engine in ("vllm", "sglang", "trtllm"):
        assert parse_args(["--engine", engine], env={"DYN_BLOCK_SIZE": "32"}).block_size == 32


def test_a_flag_of_another_engine_is_an_error_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    err = _stderr_of_failed_parse(["--engine", "mocker", "--device", "cpu"], capsys)
    assert "dynamo-rt worker --engine mocker: error: unrecognized arguments: --device cpu" in err
    err = _stderr_of_failed_parse(["--engine", "reference", "--speedup", "2"], capsys)
    assert "unrecognized arguments: --speedup 2" in err
    err = _stderr_of_failed_parse(["--engine", "vllm", "--max-num-seqs", "4"], capsys)
    assert "unrecognized arguments: --max-num-seqs 4" in err


def test_every_engine_owns_its_flags() -> None:
    """No engine declares a worker flag (or a prefix of one, which the worker's parser would take), every
    engine flag has an env twin, and the names the other tools read come from the registry."""
    worker = build_parser({})
    worker_flags = {s for a in worker._actions for s in a.option_strings}
    for name in registry.names():
        p = registry.engine_parser(name, {})
        own = [s for a in p._actions for s in a.option_strings if s.startswith("--") and not s.startswith("--no-")]
        assert own, name
        assert not {f for f in own if any(w.startswith(f) for w in worker_flags)}, name
        assert set(own) <= set(p.env_twins), name
    assert registry.names(has_manifests=True) == ["vllm", "sglang", "trtllm"]
    assert registry.names(runs_on_cpu=True) == ["reference", "mocker", "vllm"]
    with pytest.raises(ConfigError, match="--engine: unknown engine 'nope'"):
        registry.spec("nope")


def test_engine_specs_load_no_engine_framework() -> None:
    code = ("import sys, workers.main as m, workers.registry as r; "
            "[m.parse_args(['--engine', e, '--model', '/m'], env={}) for e in r.names()]; "
            "heavy = sorted(k for k in sys.modules if k.split('.')[0] in "
            "('torch', 'vllm', 'sglang', 'tensorrt_llm', 'zmq', 'transformers')); print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_help_shows_the_chosen_engines_flags(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, shown, hidden in ((["--engine", "mocker", "--help"], "DYN_MOCKER_MAX_NUM_SEQS", "--device"),
                                (["--help", "--engine", "reference"], "DYN_REF_DEVICE", "--speedup")):
        with pytest.raises(SystemExit) as exc:
            parse_args(argv, env={})
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert "--served-model-name" in out and shown in out and hidden not in out


def test_a_standin_engine_registered_the_documented_way(standin: str, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = ensure_tiny_model()
    args = parse_args(["--engine", standin, "--model", str(tiny), "--copies", "2", "--max-num-seqs", "5"],
                      env={"DYN_STANDIN_GREETING": "hi", "DYN_MAX_NUM_SEQS": "99"})
    assert (args.greeting, args.max_num_seqs, args.copies) == ("hi", 5, 2)
    engines = build_engines(args, tiny)
    assert len(engines) == 2 and all(isinstance(e, standin_engine.StandinEngine) for e in engines)
    assert (engines[0].info.name, engines[0].info.block_size, engines[0].info.path) == (tiny.name, 8, str(tiny))
    # The tools that list engines see it too.
    from dynamo_rt.local import launcher
    from planner import runner

    up = launcher.build_parser(env={}).parse_args(["--engine", standin])
    assert up.engine == standin
    planner = Parser(env={})
    runner.add_arguments(planner)
    assert planner.parse_args(["--worker-engine", standin]).worker_engine == standin
    with pytest.raises(SystemExit):
        parse_args(["--engine", standin, "--speedup", "1"], env={})
    bad = parse_args(["--engine", standin, "--copies", "0"], env={})
    with pytest.raises(ConfigError, match="--copies: must be at least 1, not 0"):
        build_engines(bad, tiny)


def test_bad_flag_value_exits_with_one_line() -> None:
    out = subprocess.run([sys.executable, "-m", "workers", "--engine", "mocker", "--extra-engine-args", "[1]"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "dynamo-rt worker: error: --extra-engine-args: a JSON object is expected, not [1]"]
    with pytest.raises(ConfigError, match="--node-rank"):
        check_args(parse_args(["--nnodes", "2", "--node-rank", "2"], env={}))


def test_multi_node_follower_runs_headless_and_registers_nothing() -> None:
    """Rank > 0 of a multi-node instance: the engine's follower mode, no etcd / NATS (none listen here)."""
    code = ("import sys; import workers.registry as r; r.ENGINES['standin'] = 'tests.workers.standin_engine'; "
            "from workers.main import main; sys.exit(main(sys.argv[1:]))")
    base = [sys.executable, "-c", code, "--engine", "standin", "--greeting", "node1",
            "--etcd-endpoints", "http://127.0.0.1:9", "--nats-endpoints", "nats://127.0.0.1:9"]
    out = subprocess.run([*base, "--nnodes", "2", "--node-rank", "1", "--dist-init-addr", "10.0.0.1:29500"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["standin headless: node1"]


def test_optional_abilities_reach_the_runtime(etcd_server: EtcdServer, nats_server: NatsServer, ns: str,
                                             standin: str) -> None:
    """Instance extras go into the instance record, the engine learns its instance id, a tiered cache's
    hashes go into the router resync snapshot; the engine serves through the runtime."""
    tiny = ensure_tiny_model()
    args = parse_args(["--engine", standin, "--model", str(tiny), "--greeting", "hey"], env={})
    eng = build_engines(args, tiny)[0]
    assert isinstance(eng, standin_engine.StandinEngine)

    async def main() -> tuple[InstanceRecord, dict[str, object], list[int]]:
        transport = Transport(NatsOptions(servers=nats_server.url))
        await transport.connect()
        reg = Registry(etcd_server.client_url, ns)
        await reg.start()
        rt = WorkerRuntime(eng, engine_name=standin, mode=Mode.AGG, registry=reg, transport=transport,
                           extra={"zone": "a"})
        await eng.start()
        await rt.start()
        try:
            values, _ = await reg.get_prefix(f"/{ns}/instances/")
            rec = msgspec.json.decode(next(iter(values.values())), type=InstanceRecord)
            kv_blocks = instance_subject(ns, COMPONENT, "kv_blocks", reg.instance_id)
            frames = [f async for f in await transport.call(kv_blocks, "snap", b"", timeout=10)]
            assert isinstance(frames[0], Data)
            snap = msgspec.msgpack.decode(frames[0].payload)
            req = GenerateRequest(request_id="r", token_ids=[1, 2, 3], stop=StopConditions(max_tokens=3))
            outs = [f async for f in await transport.call(rt.subject, "r", encode(req), timeout=10)]
            return rec, snap, [t for o in outs if isinstance(o, Data) for t in o.token_ids]
        finally:
            await rt.stop(grace=1)
            await transport.close()

    rec, snap, toks = arun(main())
    assert rec.extra == {"greeting": "hey", "zone": "a"} and rec.engine == standin and rec.kv_block_size == 8
    assert eng.instance_id == rec.instance_id
    assert snap["hashes"] == [1, 2, 3] and snap["tiers"] == {"host": [7, 8]}
    assert toks == [3, 2, 1]


def test_worker_parse_is_one_namespace_of_both_parsers() -> None:
    """What the cli's subcommand parser gets: the worker's and the engine's flags in one namespace."""
    from dynamo_rt import cli

    ns = cli.build_parser(env={}).parse_args(["worker", "--engine", "mocker", "--speedup", "3", "--mode", "decode"])
    assert isinstance(ns, argparse.Namespace)
    assert (ns.command, ns.engine, ns.speedup, ns.mode, ns.max_num_seqs) == ("worker", "mocker", 3.0, "decode", 256)

