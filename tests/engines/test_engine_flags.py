"""The vLLM / SGLang / TensorRT-LLM flag modules: importable without their engines, and every vLLM worker
command line in manifests/ parses into vLLM's argument names (SGLang's and TensorRT-LLM's are checked in their
stand-in test modules)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dynamo_rt.errors import ConfigError
from tests.engines.standin import worker_argvs
from tests.stack import ROOT
from workers.main import parse_args
from workers.vllm.flags import connector_config, engine_kwargs


def test_engine_flag_modules_import_no_engine() -> None:
    code = ("import sys, workers.main as m; "
            "[m.parse_args(['--engine', e, '--model', '/m'], env={}) for e in ('vllm', 'sglang', 'trtllm')]; "
            "heavy = sorted(k for k in sys.modules if k.split('.')[0] in ('vllm', 'sglang', 'tensorrt_llm', 'zmq')); "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_vllm_flags_from_the_manifests_parse() -> None:
    argvs = worker_argvs("vllm")
    assert len(argvs) >= 6
    for argv in argvs:
        args = parse_args(argv)
        kw = engine_kwargs(args)
        assert (kw["tensor_parallel_size"], kw["block_size"]) == (args.tp, args.block_size)
        assert kw.get("enable_expert_parallel", False) == (args.ep_size > 1)
        cc = connector_config(args)
        if args.mode == "agg":
            assert cc is None
        else:
            assert cc == {"kv_connector": "NixlConnector", "kv_load_failure_policy": "recompute",
                          "kv_role": "kv_producer" if args.mode == "prefill" else "kv_consumer"}
        if args.nnodes > 1:
            assert (kw["nnodes"], kw["node_rank"], kw["master_addr"], kw["master_port"]) == (2, 1, "10.0.0.1", 29500)


def test_vllm_extra_engine_args_apply_last() -> None:
    args = parse_args(["--engine", "vllm", "--model", "/m", "--model-dtype", "float32", "--extra-engine-args",
                       '{"dtype": "bfloat16", "max_num_seqs": 8}'])
    kw = engine_kwargs(args)
    assert (kw["dtype"], kw["max_num_seqs"]) == ("bfloat16", 8)


def test_shared_gpu_engine_flags_map_to_each_engine() -> None:
    """``workers.common.gpu_flags``: each adapter's parser declares each shared flag once, with the same env twin;
    each adapter maps the values to its engine's own names, ``--extra-engine-args`` last."""
    from workers.common.gpu_flags import extra_engine_args
    from workers.registry import engine_parser
    from workers.sglang.flags import engine_kwargs as sglang_kwargs
    from workers.trtllm.flags import engine_kwargs as trtllm_kwargs

    for engine in ("vllm", "sglang", "trtllm"):
        p = engine_parser(engine, {})
        helps = [a.help or "" for a in p._actions]
        for name, twin in (("--model-dtype", "DYN_MODEL_DTYPE"), ("--max-model-len", "DYN_MAX_MODEL_LEN"),
                           ("--enforce-eager", "DYN_ENFORCE_EAGER"), ("--block-size", "DYN_BLOCK_SIZE"),
                           ("--gpu-memory-utilization", "DYN_GPU_MEMORY_UTILIZATION"),
                           ("--kv-events", "DYN_KV_EVENTS")):
            declared = [h for h in helps if f"[env {twin};" in h]
            assert len(declared) == 1 and p.env_twins[name] == twin, (engine, name)
    env = {"DYN_MODEL_DTYPE": "float16", "DYN_MAX_MODEL_LEN": "1024", "DYN_ENFORCE_EAGER": "1",
           "DYN_GPU_MEMORY_UTILIZATION": "0.5", "DYN_KV_EVENTS": "0", "DYN_EXTRA_ENGINE_ARGS": '{"seed": 3}'}
    for engine in ("vllm", "sglang", "trtllm"):
        args = parse_args(["--engine", engine, "--model", "/m"], env=env)
        assert (args.model_dtype, args.max_model_len, args.enforce_eager, args.gpu_memory_utilization,
                args.kv_events) == ("float16", 1024, True, 0.5, False), engine
        assert extra_engine_args(args) == {"seed": 3}
    v = engine_kwargs(parse_args(["--engine", "vllm", "--model", "/m"], env=env))
    assert (v["dtype"], v["max_model_len"], v["enforce_eager"], v["gpu_memory_utilization"], v["seed"]) == (
        "float16", 1024, True, 0.5, 3)
    args = parse_args(["--engine", "sglang", "--model", "/m"], env=env)
    s = sglang_kwargs(args, "agg")
    assert (s["dtype"], s["context_length"], s["disable_cuda_graph"], s["mem_fraction_static"], s["seed"]) == (
        "float16", 1024, True, 0.5, 3)
    t = trtllm_kwargs(parse_args(["--engine", "trtllm", "--model", "/m"], env=env))
    assert (t["dtype"], t["max_seq_len"], t["cuda_graph_config"], t["kv_cache_config"]["free_gpu_memory_fraction"],
            t["seed"]) == ("float16", 1024, None, 0.5, 3)
    for bad, why in (("[1]", "a JSON object is expected"), ("{nope", "not JSON")):
        with pytest.raises(ConfigError, match=f"--extra-engine-args: {why}"):
            extra_engine_args(parse_args(["--engine", "vllm", "--model", "/m", "--extra-engine-args", bad]))
