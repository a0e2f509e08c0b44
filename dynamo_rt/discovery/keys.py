"""The key layout of a namespace in etcd, instance ids, and the events a watch yields.

Values are JSON of the :mod:`dynamo_rt.protocol` structs::

    /{ns}/instances/{component}/{endpoint}/{instance_id}   InstanceRecord
    /{ns}/models/{model_name}/{instance_id}                 ModelCard
    /{ns}/nixl/{instance_id}                                NixlRecord
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Literal


def instance_key(ns: str, component: str, endpoint: str, instance_id: str) -> str:
    return f"/{ns}/instances/{component}/{endpoint}/{instance_id}"


def model_key(ns: str, model: str, instance_id: str) -> str:
    return f"/{ns}/models/{model}/{instance_id}"


def nixl_key(ns: str, instance_id: str) -> str:
    return f"/{ns}/nixl/{instance_id}"


def new_instance_id() -> str:
    """16 lowercase hex digits, random: unique per process start."""
    return secrets.token_hex(8)


@dataclass(frozen=True, slots=True)
class WatchEvent:
    # put: key now holds value; delete: key is gone; reset: etcd lost the history the watcher was
    # following (restart without data, compaction), drop everything, the full state follows as puts;
    # synced: the state read after a (re)connect has been delivered (only with ``sync_marks=True``).
    kind: Literal["put", "delete", "reset", "synced"]
    key: str
    value: bytes = b""
