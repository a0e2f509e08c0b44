"""This host's network address as other hosts see it.

Place: engine adapters that advertise an address to their peers use it (the SGLang prefill worker's bootstrap
server, vLLM's NIXL side channel), unless a flag names the address (in Kubernetes: the pod IP).
"""

from __future__ import annotations

import contextlib
import socket


def local_address() -> str:
    """The address this host's name resolves to (the pod IP in Kubernetes); loopback as a last resort."""
    with contextlib.suppress(OSError):
        return socket.gethostbyname(socket.gethostname())
    return "127.0.0.1"
