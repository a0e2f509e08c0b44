"""The vLLM / SGLang / TensorRT-LLM flag modules: importable without their engines, and every vLLM worker
command line in manifests/ parses into vLLM's argument names (SGLang's and TensorRT-LLM's are checked in their
stand-in test modules)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tests.stack import ROOT
from workers.main import parse_args
from workers.vllm.flags import connector_config, engine_kwargs


def test_engine_flag_modules_import_no_engine() -> None:
    code = ("import sys, workers.main as m; "
            "[m.parse_args(['--engine', e, '--model', '/m']) for e in ('vllm', 'sglang', 'trtllm')]; "
            "heavy = sorted(k for k in sys.modules if k.split('.')[0] in ('vllm', 'sglang', 'tensorrt_llm', 'zmq')); "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _worker_argvs(backend: str) -> list[list[str]]:
    argvs = []
    for path in sorted(Path(ROOT, "manifests", backend).glob("**/*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            for role in (doc or {}).get("spec", {}).get("roles", []):
                for c in role.get("templatePatch", {}).get("spec", {}).get("containers", []):
                    argv = [a for a in c.get("args", []) if a != "worker"]
                    if "--engine" in argv:
                        argvs.append([a.replace("$(RBG_LWP_GROUP_SIZE)", "2").replace("$(RBG_LWP_WORKER_INDEX)", "1")
                                      .replace("$(RBG_LWP_LEADER_ADDRESS)", "10.0.0.1") for a in argv])
    return argvs


def test_vllm_flags_from_the_manifests_parse() -> None:
    argvs = _worker_argvs("vllm")
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
