"""How many CPUs this process may really use: its affinity mask, bounded by a cgroup v2 CPU quota.

``os.cpu_count()`` counts the host's CPUs: a container limited to 2 CPUs on a 64-core node would size its
thread pools for 64. Kubernetes' static CPU manager narrows the affinity mask; a plain CPU limit sets the
cgroup's ``cpu.max`` quota instead, so both are read."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """CPUs in the affinity mask (``os.cpu_count()`` where there is none), at most the cgroup v2 quota rounded
    up (``cpu.max``: "<quota> <period>", or "max <period>" for none); at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max" and int(period) > 0:
            n = min(n, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(1, n)
