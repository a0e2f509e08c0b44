"""A minimal Kubernetes API client for the planner's RBG connector: httpx, GET and PATCH, nothing else.

Credentials come from the pod's service account (in-cluster: the token and CA under
``/var/run/secrets/kubernetes.io/serviceaccount``, the API server from ``KUBERNETES_SERVICE_HOST`` /
``KUBERNETES_SERVICE_PORT``) or from a kubeconfig file (``--kubeconfig`` or ``KUBECONFIG``: the current
context's server, CA, and a bearer token, token file or client certificate; exec plugins are not
supported). The service-account token is re-read every minute, as bound tokens rotate.

HTTP and TLS failures become :class:`dynamo_rt.errors.Unavailable`; an API error status becomes
:class:`KubeApiError` carrying the status and the API server's message.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import shutil
import ssl
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from dynamo_rt.errors import DynamoError, ErrorCode, InvalidRequest, Unavailable

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TOKEN_REFRESH_S = 60.0

JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"


class KubeApiError(DynamoError):
    """The API server answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        code = {400: ErrorCode.INVALID_REQUEST, 401: ErrorCode.INVALID_REQUEST, 403: ErrorCode.INVALID_REQUEST,
                404: ErrorCode.NOT_FOUND, 409: ErrorCode.INVALID_REQUEST, 422: ErrorCode.INVALID_REQUEST,
                429: ErrorCode.UNAVAILABLE}.get(status, ErrorCode.UNAVAILABLE)
        super().__init__(f"Kubernetes API {status}: {message}", code=code)
        self.http_status = status


@dataclass
class KubeConfig:
    server: str
    namespace: str = "default"
    token: str | None = None
    token_file: str | None = None
    ca_file: str | None = None
    ca_data: str | None = None  # PEM
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False
    source: str = ""  # where it came from, for the log line
    _tmpdir: str | None = None  # holds client cert/key written out of *-data fields

    def cleanup(self) -> None:
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None


def in_cluster_config(env: Mapping[str, str] | None = None, sa_dir: Path = SERVICE_ACCOUNT_DIR) -> KubeConfig:
    env = os.environ if env is None else env
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
    token = sa_dir / "token"
    if not host or not token.is_file():
        raise InvalidRequest("not in a cluster: KUBERNETES_SERVICE_HOST or the service-account token is missing")
    h = f"[{host}]" if ":" in host else host
    ns_file = sa_dir / "namespace"
    ns = ns_file.read_text().strip() if ns_file.is_file() else "default"
    ca = sa_dir / "ca.crt"
    return KubeConfig(server=f"https://{h}:{port}", namespace=ns, token_file=str(token),
                      ca_file=str(ca) if ca.is_file() else None, source=f"in-cluster ({sa_dir})")


def _named(items: Any, name: str, kind: str, path: Path) -> dict[str, Any]:
    for it in items or []:
        if isinstance(it, dict) and it.get("name") == name:
            body = it.get(kind)
            if isinstance(body, dict):
                return body
    raise InvalidRequest(f"kubeconfig {path}: no {kind} named {name!r}")


def kubeconfig_config(path: str | Path, context: str | None = None) -> KubeConfig:
    p = Path(path).expanduser()
    try:
        doc = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidRequest(f"cannot read kubeconfig {p}: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidRequest(f"kubeconfig {p} is not a mapping")
    ctx_name = context or doc.get("current-context")
    if not ctx_name:
        raise InvalidRequest(f"kubeconfig {p} has no current-context")
    ctx = _named(doc.get("contexts"), ctx_name, "context", p)
    cluster = _named(doc.get("clusters"), ctx.get("cluster", ""), "cluster", p)
    user = _named(doc.get("users"), ctx.get("user", ""), "user", p) if ctx.get("user") else {}
    if "exec" in user or "auth-provider" in user:
        raise InvalidRequest(f"kubeconfig {p}: exec / auth-provider credentials are not supported; use a "
                             "service-account token (`kubectl create token`) or a client certificate")
    base = p.parent

    def rel(v: Any) -> str | None:
        return None if not v else str(base / str(v)) if not os.path.isabs(str(v)) else str(v)

    cfg = KubeConfig(server=str(cluster.get("server", "")).rstrip("/"), namespace=ctx.get("namespace") or "default",
                     ca_file=rel(cluster.get("certificate-authority")),
                     insecure=bool(cluster.get("insecure-skip-tls-verify", False)),
                     token=user.get("token"), token_file=rel(user.get("tokenFile")),
                     cert_file=rel(user.get("client-certificate")), key_file=rel(user.get("client-key")),
                     source=f"kubeconfig {p} (context {ctx_name})")
    if not cfg.server:
        raise InvalidRequest(f"kubeconfig {p}: cluster of context {ctx_name!r} has no server")
    if cluster.get("certificate-authority-data"):
        cfg.ca_data = base64.b64decode(cluster["certificate-authority-data"]).decode()
    if user.get("client-certificate-data") or user.get("client-key-data"):
        # ssl wants files for the client pair: write them where only we can read them.
        cfg._tmpdir = tempfile.mkdtemp(prefix="dyn-kube-")
        for field, attr in (("client-certificate-data", "cert_file"), ("client-key-data", "key_file")):
            if user.get(field):
                f = Path(cfg._tmpdir) / attr
                f.write_bytes(base64.b64decode(user[field]))
                f.chmod(0o600)
                setattr(cfg, attr, str(f))
    return cfg


def load_config(kubeconfig: str | None = None, env: Mapping[str, str] | None = None,
                sa_dir: Path = SERVICE_ACCOUNT_DIR) -> KubeConfig:
    """An explicit kubeconfig, else the in-cluster service account, else ``KUBECONFIG`` / ~/.kube/config."""
    env = os.environ if env is None else env
    if kubeconfig:
        return kubeconfig_config(kubeconfig)
    if env.get("KUBERNETES_SERVICE_HOST") and (sa_dir / "token").is_file():
        return in_cluster_config(env, sa_dir)
    for cand in (env.get("KUBECONFIG") or "").split(os.pathsep):
        if cand and Path(cand).expanduser().is_file():
            return kubeconfig_config(cand)
    home = Path(env.get("HOME", "~")).expanduser() / ".kube" / "config"
    if home.is_file():
        return kubeconfig_config(home)
    raise InvalidRequest("no Kubernetes credentials: not in a cluster, and no kubeconfig (--kubeconfig, "
                         "KUBECONFIG, ~/.kube/config)")


class KubeClient:
    """GET and PATCH against the API server of ``cfg``."""

    def __init__(self, cfg: KubeConfig, *, timeout: float = 10.0) -> None:
        self.cfg = cfg
        verify: ssl.SSLContext | bool = True
        if cfg.server.startswith("https://"):
            if cfg.insecure:
                verify = False
            else:
                verify = ssl.create_default_context(cafile=cfg.ca_file, cadata=cfg.ca_data)
                if cfg.cert_file and cfg.key_file:
                    verify.load_cert_chain(cfg.cert_file, cfg.key_file)
        self._http = httpx.AsyncClient(base_url=cfg.server, verify=verify, timeout=timeout)
        self._token: str | None = cfg.token
        self._token_read = 0.0

    async def close(self) -> None:
        await self._http.aclose()
        self.cfg.cleanup()

    def _headers(self) -> dict[str, str]:
        if self.cfg.token_file and time.monotonic() - self._token_read > TOKEN_REFRESH_S:
            try:
                self._token = Path(self.cfg.token_file).read_text().strip()
                self._token_read = time.monotonic()
            except OSError as exc:
                log.warning("cannot read token %s: %s", self.cfg.token_file, exc)
        h = {"Accept": "application/json", "User-Agent": "dynamo-rt-planner"}
        if self._token:
            h["Authorization"] = f"Bearer {self._token}"
        return h

    async def request(self, method: str, path: str, body: Any = None, content_type: str | None = None
                      ) -> dict[str, Any]:
        headers = self._headers()
        content = None
        if body is not None:
            content = json.dumps(body).encode()
            headers["Content-Type"] = content_type or "application/json"
        try:
            r = await self._http.request(method, path, content=content, headers=headers)
        except httpx.HTTPError as exc:
            raise Unavailable(f"Kubernetes API {self.cfg.server} unreachable: {exc!r}") from None
        if r.status_code >= 400:
            msg = r.text
            with contextlib.suppress(ValueError):
                msg = str(r.json().get("message", msg))
            raise KubeApiError(r.status_code, f"{method} {path}: {msg}")
        try:
            data = r.json()
        except ValueError:
            raise Unavailable(f"Kubernetes API {method} {path}: the answer is not JSON") from None
        if not isinstance(data, dict):
            raise Unavailable(f"Kubernetes API {method} {path}: the answer is not an object")
        return data

    async def get(self, path: str) -> dict[str, Any]:
        return await self.request("GET", path)

    async def patch(self, path: str, body: Any, content_type: str) -> dict[str, Any]:
        return await self.request("PATCH", path, body, content_type)
