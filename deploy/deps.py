"""The services every group needs beside it: one etcd (discovery) and one NATS server (request plane),
as plain Deployments and Services (``dynamo-rt manifests --deps etcd|nats``, ``manifests/deps/``).

Both keep only what a restart rebuilds, so they run as one replica on an emptyDir; point
``--etcd-url`` / ``--nats-url`` at a production cluster instead.
"""

from __future__ import annotations

from typing import Any

from deploy.render import meta

ETCD_IMAGE = "quay.io/coreos/etcd:v3.5.17"
NATS_IMAGE = "nats:2.10.22-alpine"


def _service(name: str, namespace: str | None, ports: list[tuple[str, int]]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(name, namespace, {"app.kubernetes.io/name": name}),
        "spec": {
            "selector": {"app.kubernetes.io/name": name},
            "ports": [{"name": pname, "port": port, "targetPort": port, "protocol": "TCP"} for pname, port in ports],
        },
    }


def _deployment(name: str, namespace: str | None, container: dict[str, Any],
                volumes: list[dict[str, Any]]) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(name, namespace, labels),
        "spec": {
            "replicas": 1,
            # Recreate: two copies must never run at once against the same name.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": dict(labels)},
            "template": {
                "metadata": {"labels": dict(labels)},
                "spec": {"containers": [container], "volumes": volumes},
            },
        },
    }


def etcd_documents(namespace: str | None = None) -> list[dict[str, Any]]:
    """Single-member etcd. Its data is leases and leased keys only, so an emptyDir is enough: after a
    restart every process re-registers within one lease TTL."""
    container = {
        "name": "etcd",
        "image": ETCD_IMAGE,
        "command": [
            "/usr/local/bin/etcd", "--name=etcd-0", "--data-dir=/var/lib/etcd",
            "--listen-client-urls=http://0.0.0.0:2379", "--advertise-client-urls=http://etcd:2379",
            "--listen-peer-urls=http://0.0.0.0:2380", "--initial-advertise-peer-urls=http://127.0.0.1:2380",
            "--initial-cluster=etcd-0=http://127.0.0.1:2380",
        ],
        "ports": [{"name": "client", "containerPort": 2379}, {"name": "peer", "containerPort": 2380}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": "client"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/health", "port": "client"}, "initialDelaySeconds": 10,
                          "periodSeconds": 10},
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "volumeMounts": [{"name": "data", "mountPath": "/var/lib/etcd"}],
    }
    return [
        _deployment("etcd", namespace, container, [{"name": "data", "emptyDir": {}}]),
        _service("etcd", namespace, [("client", 2379)]),
    ]


def nats_documents(namespace: str | None = None) -> list[dict[str, Any]]:
    """Single NATS server with JetStream (the object store holds tokenizer files) and monitoring on 8222."""
    container = {
        "name": "nats",
        "image": NATS_IMAGE,
        "args": ["-js", "-sd", "/data", "-m", "8222"],
        "ports": [{"name": "client", "containerPort": 4222}, {"name": "monitor", "containerPort": 8222}],
        "readinessProbe": {"httpGet": {"path": "/healthz?js-enabled-only=true", "port": "monitor"},
                           "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "monitor"}, "initialDelaySeconds": 10,
                          "periodSeconds": 10},
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "2Gi"}},
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
    }
    return [
        _deployment("nats", namespace, container, [{"name": "data", "emptyDir": {}}]),
        _service("nats", namespace, [("client", 4222), ("monitor", 8222)]),
    ]
