"""A vLLM general plugin (entry point group ``vllm.general_plugins``): NIXL set up for a CPU host.

vLLM's NixlConnector (vLLM 0.32.0, ``kv_connector/v1/nixl/base_worker.py``) builds its NIXL agent with
``nixl_agent_config(num_threads=..., capture_telemetry=True)`` and UCX's default init parameters. On a small CPU
host that goes wrong (measured here with nixl 1.5.1, 2 cores, a prefill and a decode instance):

* NIXL's progress thread polls with no pause (``pthrDelay = 0`` in ``nixl._api``): each instance keeps ~0.9
  core busy while idle, starving the engines and every other process (requests took 0.5-1.5 s instead of
  ~60 ms; NATS requests to the workers timed out).
* The thread cannot simply be turned off: an idle vLLM prefill engine does not step, so nothing else
  progresses its NIXL worker, and a decode worker's first READ from it then waited for the prefill side's
  next request (4-40 s, or for ever).
* With UCX's default error handling (``peer``) connection setup and notifications avoid UCX's shared-memory
  transports (they have no peer-failure handler) and go over TCP.

So on a CPU platform this plugin keeps NIXL's progress thread but gives it a poll timeout
(``DYN_VLLM_NIXL_PROGRESS_DELAY_US``, default 5000): NIXL's UCX progress thread waits in ``poll()`` on its UCX
workers' event fds with that timeout (NIXL's ``nixlUcxSharedThread``), so it wakes on every UCX event and at
least every 5 ms, and burns no CPU in between (measured here: one core per agent with NIXL's 0, nothing with
5000). Running the spinning threads under ``SCHED_IDLE`` only (this plugin's first answer) still left both
cores busy while a prefill / decode pair was idle, and the P/D tests then met host stalls of tens of seconds
(etcd leases expired; the frontend failed the requests caught in one).
The agent's own threads still run under ``SCHED_IDLE``; UCX is created with ``ucx_error_handling_mode=none``
(what ``dynamo_rt.kv`` uses on CPU: shared-memory wire-up, one-sided CMA reads; a departed peer still fails a
read at once with ESRCH). ``DYN_VLLM_NIXL_CPU_MODE``: ``auto`` (default: on for a CPU platform only), ``1``
or ``0``.

vLLM runs general plugins in each of its processes (engine core, model workers) before the connector builds
its agent; the plugin swaps ``nixl._api.nixl_agent`` (the name vLLM's ``vllm.distributed.nixl_utils`` loads) for
a subclass. Registered by the ``vllm.general_plugins`` entry point ``dynamo_rt_nixl`` (pyproject.toml, or
``scripts/setup-vllm-cpu.sh`` until it is there).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

log = logging.getLogger(__name__)

ENV = "DYN_VLLM_NIXL_CPU_MODE"
DELAY_ENV = "DYN_VLLM_NIXL_PROGRESS_DELAY_US"
DEFAULT_DELAY_US = 5000


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
    base_agent = api.nixl_agent
    delay_us = int(os.environ.get(DELAY_ENV) or DEFAULT_DELAY_US)

    class CpuAgent(base_agent):  # type: ignore[misc, valid-type]
        """``nixl_agent`` whose progress thread polls with a timeout, whose own threads run under ``SCHED_IDLE``
        and whose UCX backend uses error handling mode ``none`` unless asked otherwise."""

        dynamo_rt_cpu_mode = True
        progress_delay_us = delay_us

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            before = _threads()
            # nixl_agent.__init__ fills a nixlAgentConfig (pthrDelay = 0, no parameter for it) and hands it to
            # nixlBind.nixlAgent: set the delay on its way there.
            bind = api.nixlBind
            make_agent = bind.nixlAgent

            def with_delay(name: str, config: Any) -> Any:
                config.pthrDelay = delay_us
                return make_agent(name, config)

            bind.nixlAgent = with_delay
            try:
                super().__init__(*args, **kwargs)
            finally:
                bind.nixlAgent = make_agent
            for tid in _threads() - before:
                with contextlib.suppress(OSError):
                    os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))

        def create_backend(self, backend: str, initParams: dict[str, str] | None = None) -> Any:
            params = dict(initParams or {})
            if backend == "UCX":
                params.setdefault("ucx_error_handling_mode", "none")
            return super().create_backend(backend, params)

    api.nixl_agent = CpuAgent
    log.debug("vLLM's NIXL agents in this process: progress poll timeout %d us, threads at SCHED_IDLE, UCX error "
              "handling none", delay_us)


def _threads() -> set[int]:
    """Thread ids of this process (the agent's threads are the ones its constructor adds)."""
    return {int(t) for t in os.listdir("/proc/self/task")}
