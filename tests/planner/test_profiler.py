"""``dynamo-rt profile``: against a running stack (``--url``) and with a stack of its own; the JSON it
writes is what the planner loads. Small sweeps on a fast mocker (--speedup 10): the shapes are checked
exactly, the measured times only for being times."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from dynamo_rt.local.services import EtcdServer, NatsServer
from planner.profile import PROFILE_FORMAT, Profile
from planner.profiler import build_parser, profile
from tests.stack import ROOT, Stack
from workers.mocker.engine import TimingModel


def test_profile_a_running_stack(etcd_server: EtcdServer, nats_server: NatsServer, ns: str) -> None:
    stack = Stack(etcd_server.client_url, nats_server.url, ns)
    stack.start_frontend()
    # Speedup 2: steps of 5 ms, so the decode sweep's requests overlap even on a busy machine.
    stack.add_worker("mocker", "agg", "--served-model-name", "prof", "--speedup", "2")
    try:
        stack.wait_ready(1, 120)
        args = build_parser(env={}).parse_args(["--url", stack.url, "--isl", "256,64", "--concurrency", "1,8",
                                                "--repeats", "1", "--decode-osl", "32", "--speedup", "2",
                                                "--max-concurrency", "128"])
        doc = profile(args)
    finally:
        stack.stop()
    assert (doc["format"], doc["model"], doc["engine"], doc["mode"], doc["speedup"]) == (
        PROFILE_FORMAT, "prof", "unknown", "external", 2.0)
    assert doc["prefill"]["isl"] == [64, 256] and len(doc["prefill"]["ttft_s"]) == 2
    curve = doc["decode"][0]
    assert (curve["context_length"], curve["isl"], curve["osl"]) == (32 + 16, 32, 32)
    # Concurrency is measured (the mean number of requests decoding together), one point per sweep step.
    assert len(curve["concurrency"]) == 2 and curve["concurrency"][0] == 1.0 < curve["concurrency"][1] <= 8
    assert all(t > 0 for t in [*doc["prefill"]["ttft_s"], *curve["itl_s"]])
    assert "analytic" not in doc and doc["max_concurrency"] == 128
    p = Profile.from_dict(doc)
    assert p.prefill_isl == (64.0, 256.0) and p.max_concurrency == 128


def test_profile_cli_with_its_own_stack(tmp_path: Path) -> None:
    out = tmp_path / "mocker.json"
    proc = subprocess.run(
        [sys.executable, "-m", "dynamo_rt", "profile", "--mode", "agg", "--speedup", "10", "--isl", "64,128",
         "--concurrency", "1,2", "--repeats", "1", "--decode-osl", "16", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert (doc["engine"], doc["mode"], doc["speedup"], doc["worker_args"]) == ("mocker", "agg", 10.0,
                                                                                ["--speedup", "10"])
    tm = TimingModel()
    analytic = doc["analytic"]
    assert analytic["timing"] == {"prefill_ms_per_token": 0.07, "prefill_base_ms": 2.0, "decode_ms_base": 10.0,
                                  "decode_ms_per_seq": 0.1, "transfer_ms_per_block": 0.08, "max_num_seqs": 256}
    assert analytic["prefill_ttft_s"] == [tm.prefill_ms(64) / 1e3, tm.prefill_ms(128) / 1e3]
    conc = doc["decode"][0]["concurrency"]
    assert analytic["decode_concurrency"] == conc
    assert analytic["decode_itl_s"] == [tm.step_ms(c, 0) / 1e3 for c in conc]  # type: ignore[arg-type]
    assert doc["max_concurrency"] == 256
    loaded = Profile.load(out)
    assert loaded.prefill_isl == (64.0, 128.0) and loaded.meta["engine"] == "mocker"
    assert "profile written to" in proc.stderr
