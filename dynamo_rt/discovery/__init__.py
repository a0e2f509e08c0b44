"""Service discovery on etcd: one lease per process, its keys, and watched views of a namespace.

    keys.py      the key layout of a namespace, instance ids, WatchEvent
    etcd.py      the etcd client boundary: the only module importing grpc / etcd3aio (and where gRPC's
                 fork handlers are turned off); every backend failure becomes DiscoveryError there
    registry.py  Registry: a process's lease (kept alive, re-created and its keys re-put when lost), put /
                 delete / get_prefix, watch_prefix
    watch.py     following a prefix across etcd restarts (diff or reset after a reconnect)
    view.py      DiscoveryView: the decoded in-memory view of /{ns}/ the frontend and routers read
"""

from dynamo_rt.discovery.keys import WatchEvent, instance_key, model_key, new_instance_id, nixl_key
from dynamo_rt.discovery.registry import DEFAULT_TTL, Registry
from dynamo_rt.discovery.view import DiscoveryView, Listener

__all__ = [
    "DEFAULT_TTL",
    "DiscoveryView",
    "Listener",
    "Registry",
    "WatchEvent",
    "instance_key",
    "model_key",
    "new_instance_id",
    "nixl_key",
]
