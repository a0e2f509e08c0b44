"""Tenants: which API key names which tenant, and the prefix-cache salt a request's tenant gets.

Place: :class:`frontend.app.FastPath` authenticates every request with :meth:`KeyRing.authenticate` (the
``Authorization: Bearer`` header, or ``x-api-key`` as the Anthropic API sends it) and stores the tenant in
the ASGI scope (:data:`TENANT_SCOPE_KEY`); :meth:`frontend.app.Frontend.prepare` turns it into the
request's ``cache_salt`` with :func:`cache_salt`. The salt travels in ``GenerateRequest.cache_salt`` and
seeds every block hash (:func:`dynamo_rt.kvhash.chain_root`): engines, KV tiers, the router's index and the
KV events all see one tenant's prefixes under hashes no other tenant's prompt can produce, so a cached
prefix (and its shorter time to first token) is never shared across tenants.

The keys file (``--api-keys-file``) is JSON: ``{"tenants": {"acme": ["sk-a1", "sk-a2"], "beta": ["sk-b"]}}``.
Keys of one tenant share its cache. The single ``--api-key`` is the tenant ``default``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from dynamo_rt.errors import ConfigError, InvalidRequest

# Where FastPath leaves the authenticated tenant for the request handlers (an ASGI scope key).
TENANT_SCOPE_KEY = "dynamo.tenant"
DEFAULT_TENANT = "default"
_SALT_DOMAIN = b"dynamo-rt/tenant-cache-salt/v1\0"
_MAX_CLIENT_SALT = 256


class KeyRing:
    """API key -> tenant. A key is looked up by its SHA-256 digest, then compared in constant time: the
    time taken depends on the digest only, so it says nothing about how much of a key was right, and it
    stays one dict lookup however many keys there are."""

    def __init__(self, keys: Mapping[str, str]) -> None:
        self._by_digest = {hashlib.sha256(k.encode()).digest(): (k.encode(), t) for k, t in keys.items()}

    def __len__(self) -> int:
        return len(self._by_digest)

    @property
    def tenants(self) -> set[str]:
        return {t for _, t in self._by_digest.values()}

    def lookup(self, given: bytes) -> str | None:
        entry = self._by_digest.get(hashlib.sha256(given).digest())
        if entry is None or not hmac.compare_digest(given, entry[0]):
            return None
        return entry[1]

    def authenticate(self, headers: Sequence[tuple[bytes, bytes]]) -> str | None:
        """The tenant of the request's key (raw ASGI headers), None when it has no known key."""
        given: bytes | None = None
        for name, value in headers:
            if name == b"authorization":
                scheme, _, rest = value.partition(b" ")
                given = rest if scheme.lower() == b"bearer" and rest else b""
                break
            if name == b"x-api-key" and given is None:
                given = value
        return self.lookup(given) if given else None


def load_keys(api_key: str | None, keys_file: str | None) -> KeyRing | None:
    """The keys the frontend accepts (None: no authentication). ConfigError naming the flag on a bad file."""
    keys: dict[str, str] = {}
    if keys_file:
        keys.update(_read_keys_file(keys_file))
    if api_key:
        if keys.get(api_key, DEFAULT_TENANT) != DEFAULT_TENANT:
            raise ConfigError("--api-key", "is also a key of another tenant in --api-keys-file")
        keys[api_key] = DEFAULT_TENANT
    return KeyRing(keys) if keys else None


def _read_keys_file(path: str) -> dict[str, str]:
    flag = "--api-keys-file"
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(flag, f"cannot be read: {exc.strerror or exc}") from None
    try:
        doc: Any = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # The message carries a position, never the text around it (which would be a key).
        raise ConfigError(flag, f"is not JSON (line {exc.lineno}, column {exc.colno})") from None
    tenants = doc.get("tenants") if isinstance(doc, dict) else None
    if not isinstance(tenants, dict) or not tenants:
        raise ConfigError(flag, 'must be {"tenants": {"<tenant>": ["<key>", ...], ...}} with at least one tenant')
    out: dict[str, str] = {}
    for tenant, keys in tenants.items():
        if not tenant.strip():
            raise ConfigError(flag, "has an empty tenant name")
        if not isinstance(keys, list) or not keys:
            raise ConfigError(flag, f"tenant {tenant!r}: its keys must be a non-empty list of strings")
        for i, key in enumerate(keys):
            if not isinstance(key, str) or not key.strip() or key != key.strip():
                raise ConfigError(flag, f"tenant {tenant!r}: key #{i + 1} must be a non-empty string without "
                                        "surrounding whitespace")
            other = out.setdefault(key, tenant)
            if other != tenant:
                raise ConfigError(flag, f"key #{i + 1} of tenant {tenant!r} is also a key of tenant {other!r}")
    return out


def cache_salt(tenant: str | None, client_salt: str | None = None) -> str:
    """The request's salt (hex, "" for none): derived from the authenticated tenant, with the client's
    ``cache_salt`` mixed in when given; it never replaces the tenant, so no client salt reaches another
    tenant's cache. Without authentication only a client salt salts."""
    if tenant is None and not client_salt:
        return ""
    h = hashlib.sha256(_SALT_DOMAIN)
    # Length-prefixed fields: ("ab", "c") and ("a", "bc") cannot digest alike; no tenant differs from "".
    for part in (b"" if tenant is None else b"t" + tenant.encode(), (client_salt or "").encode()):
        h.update(len(part).to_bytes(4, "little") + part)
    return h.hexdigest()


def check_client_salt(value: str | None) -> str | None:
    """A request's ``cache_salt``: a non-empty string of at most 256 characters (None when absent)."""
    if value is None:
        return None
    if not value or len(value) > _MAX_CLIENT_SALT:
        raise InvalidRequest(f"cache_salt must be a non-empty string of at most {_MAX_CLIENT_SALT} characters",
                             param="cache_salt")
    return value
