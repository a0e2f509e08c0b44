"""A vLLM general plugin (entry point group ``vllm.general_plugins``): NIXL and vLLM's NixlConnector set up for a
CPU host.

vLLM's NixlConnector (vLLM 0.32.0, ``kv_connector/v1/nixl/base_worker.py``) builds its NIXL agent with
``nixl_agent_config(num_threads=..., capture_telemetry=True)`` and UCX's default init parameters, and on a CPU
platform moves the thread that builds it (the model runner's) to the last core of each NUMA node. On a small CPU
host that goes wrong (measured here with nixl 1.5.1, 2 cores, a prefill and a decode instance):

* NIXL's progress thread polls with no pause (``pthrDelay = 0`` in ``nixl._api``): each instance keeps ~0.9
  core busy while idle, starving the engines and every other process (requests took 0.5-1.5 s instead of
  ~60 ms; NATS requests to the workers timed out).
* The thread cannot simply be turned off: an idle vLLM prefill engine does not step, so nothing else
  progresses its NIXL worker, and a decode worker's first READ from it then waited for the prefill side's
  next request (4-40 s, or for ever).
* With UCX's default error handling (``peer``) connection setup and notifications avoid UCX's shared-memory
  transports (they have no peer-failure handler) and go over TCP.
* The core move (``NixlBaseConnectorWorker.__init__``: ``os.sched_setaffinity(0, [last core of each NUMA
  node])``, from ``CpuPlatform.discover_numa_topology``) ignores ``VLLM_CPU_OMP_THREADS_BIND``: with the
  prefill instance bound to core 0 and the decode instance to core 1, the prefill instance's model runner ran
  on core 1 beside the decode instance's, while the rest of its threads stayed on core 0. Every vLLM worker
  process also spins (``sched_yield``) for a second after each step it runs (its shared-memory queue's busy
  period), so a prefill right after a decode shared core 1 with a spinning thread: prefill-only requests took
  200-1000 ms instead of 12 ms.

So on a CPU platform this plugin

* keeps NIXL's progress thread but gives it a poll timeout (``DYN_VLLM_NIXL_PROGRESS_DELAY_US``, default 5000):
  NIXL's UCX progress thread waits in ``poll()`` on its UCX workers' event fds with that timeout (NIXL's
  ``nixlUcxSharedThread``), so it wakes on every UCX event and at least every 5 ms, and burns no CPU in between
  (measured here: one core per agent with NIXL's 0, nothing with 5000). The agent's threads keep the normal
  scheduling class: they are on the transfer's path (the decode side's READ progresses on its progress thread),
  and under ``SCHED_IDLE`` (this plugin's earlier setting) they barely ran beside the model runner's spinning
  thread on the same core: decode requests waited 80-900 ms for 4 KiB-1 MiB reads that take well under 1 ms.
* creates UCX with ``ucx_error_handling_mode=none`` (what ``dynamo_rt.kv`` uses on CPU: shared-memory wire-up,
  one-sided CMA reads; a departed peer still fails a read at once with ESRCH);
* when ``VLLM_CPU_OMP_THREADS_BIND`` names the instance's cores (anything but ``auto`` / ``nobind``), makes the
  connector's core move stay within them: ``discover_numa_topology`` (used by that move only) answers the
  calling thread's own cores, so the thread goes to the last of its own cores (with one core, where it is).
  With ``auto`` vLLM reserves that core for the connector itself, and its choice stands.

``DYN_VLLM_NIXL_CPU_MODE``: ``auto`` (default: on for a CPU platform only), ``1`` or ``0``.

vLLM runs general plugins in each of its processes (engine core, model workers) before the connector builds
its agent; the plugin swaps ``nixl._api.nixl_agent`` (the name vLLM's ``vllm.distributed.nixl_utils`` loads) for
a subclass. Registered by the ``vllm.general_plugins`` entry point ``dynamo_rt_nixl`` (pyproject.toml, or
``scripts/setup-vllm-cpu.sh`` until it is there).
"""

from __future__ import annotations

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
    _keep_bound_cores()
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
        """``nixl_agent`` whose progress thread polls with a timeout and whose UCX backend uses error handling
        mode ``none`` unless asked otherwise."""

        dynamo_rt_cpu_mode = True
        progress_delay_us = delay_us

        def __init__(self, *args: Any, **kwargs: Any) -> None:
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

        def create_backend(self, backend: str, initParams: dict[str, str] | None = None) -> Any:
            params = dict(initParams or {})
            if backend == "UCX":
                params.setdefault("ucx_error_handling_mode", "none")
            return super().create_backend(backend, params)

    api.nixl_agent = CpuAgent
    log.debug("vLLM's NIXL agents in this process: progress poll timeout %d us, UCX error handling none", delay_us)


def bound_cores() -> bool:
    """Whether ``VLLM_CPU_OMP_THREADS_BIND`` names this instance's cores (vLLM's default is ``auto``)."""
    return os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto").strip() not in ("", "auto", "nobind")


def _keep_bound_cores() -> None:
    """Make vLLM's NixlConnector keep its thread on the instance's own cores (see the module docstring)."""
    if not bound_cores():
        return
    from vllm.platforms import current_platform

    platform = type(current_platform)
    if not hasattr(platform, "discover_numa_topology") or getattr(platform, "dynamo_rt_own_cores", False):
        return

    def own_cores(cls: Any) -> list[list[int]]:
        # One "node" holding the calling thread's cores: the connector moves the thread to the last of them.
        return [sorted(os.sched_getaffinity(0))]

    platform.discover_numa_topology = classmethod(own_cores)
    platform.dynamo_rt_own_cores = True
