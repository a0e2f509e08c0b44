"""A vLLM general plugin (entry point group ``vllm.general_plugins``): NIXL set up for a CPU host.

vLLM's NixlConnector (vLLM 0.32.0, ``kv_connector/v1/nixl/base_worker.py``) builds its NIXL agent with
``nixl_agent_config(num_threads=..., capture_telemetry=True)`` and UCX's default init parameters. On a small
CPU host that goes wrong twice (measured here with nixl 1.5.1, 2 cores, a prefill and a decode instance):

* NIXL's progress thread is on, and nixl 1.5 runs it with no pause between polls (``pthrDelay = 0`` in
  ``nixl._api``): each instance keeps ~0.9 core busy while idle, starving the engines and every other
  process (requests took 0.5-1.5 s instead of ~60 ms; NATS requests to the workers timed out).
* With the thread off, UCX's default error handling (``peer``) rules out its shared-memory transports for
  connection setup, so a decode worker's READ waits until the prefill worker next progresses its NIXL
  worker -- which an idle vLLM engine does not do: reads stalled for 4-40 s.

So on a CPU platform this plugin gives vLLM's agents what ``dynamo_rt.kv`` uses on CPU: no progress thread,
and UCX with ``ucx_error_handling_mode=none``, so a same-host READ is one-sided (CMA, ``process_vm_readv``) and
completes without the prefill side doing anything; vLLM polls transfer states and notifications every engine
step, which is all the progress NIXL then needs. A departed prefill worker still fails the read at once (CMA
gets ESRCH). ``DYN_VLLM_NIXL_CPU_MODE``: ``auto`` (default: on for a CPU platform only), ``1`` or ``0``.

vLLM runs general plugins in each of its processes (engine core, model workers) before the connector builds
its agent; the plugin swaps ``nixl._api.nixl_agent_config`` / ``nixl_agent`` (the names vLLM's
``vllm.distributed.nixl_utils`` loads) for subclasses with these defaults. Registered by the
``vllm.general_plugins`` entry point ``dynamo_rt_nixl`` (``scripts/setup-vllm-cpu.sh``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)

ENV = "DYN_VLLM_NIXL_CPU_MODE"


def enabled() -> bool:
    mode = os.environ.get(ENV, "auto").strip().lower()
    if mode in ("1", "true", "on"):
        return True
    if mode in ("0", "false", "off"):
        return False
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def register() -> None:
    """The plugin entry point (vLLM may call it several times per process: it is idempotent)."""
    if not enabled():
        return
    _no_idle_spin()
    # vLLM sets UCX_RCACHE_MAX_UNRELEASED (a UCX leak work-around) just before its own first NIXL import, and
    # cannot once NIXL is imported: let it do so before this plugin imports NIXL.
    try:
        from vllm.distributed import nixl_utils

        getattr(nixl_utils, "_maybe_set_ucx_rcache_limit", lambda: None)()
    except ImportError:
        pass
    try:
        import nixl._api as api
    except ImportError:
        return  # no NIXL: nothing to set up
    if getattr(api.nixl_agent, "dynamo_rt_cpu_mode", False):
        return
    base_config, base_agent = api.nixl_agent_config, api.nixl_agent

    class CpuAgentConfig(base_config):  # type: ignore[misc, valid-type]
        """``nixl_agent_config`` whose progress thread is off unless asked for."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if not args:  # enable_prog_thread is the first positional parameter
                kwargs.setdefault("enable_prog_thread", False)
            super().__init__(*args, **kwargs)

    class CpuAgent(base_agent):  # type: ignore[misc, valid-type]
        """``nixl_agent`` whose UCX backend uses error handling mode ``none`` unless asked otherwise."""

        dynamo_rt_cpu_mode = True

        def create_backend(self, backend: str, initParams: dict[str, str] | None = None) -> Any:
            params = dict(initParams or {})
            if backend == "UCX":
                params.setdefault("ucx_error_handling_mode", "none")
            return super().create_backend(backend, params)

    api.nixl_agent_config = CpuAgentConfig
    api.nixl_agent = CpuAgent
    log.debug("vLLM's NIXL agents in this process: no progress thread, UCX error handling none")


def _no_idle_spin() -> None:
    from vllm.distributed.device_communicators import shm_broadcast

    cls = shm_broadcast.SpinCondition
    if isinstance(cls.__dict__.get("busy_loop_s"), property):
        return
    cls.busy_loop_s = property(lambda self: 0.0, lambda self, value: None)
