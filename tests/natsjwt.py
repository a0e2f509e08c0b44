"""Test infrastructure: NATS decentralized auth (operator mode) made from scratch, for the creds-file tests.

An operator signs accounts, an account signs users; nats-server trusts the operator's JWT and verifies the
chain at each client's connect, the client proving it holds the user's private key by signing the server's
nonce (nats-py does that from a ``.creds`` file). This module makes the nkeys (``nkeys`` package), mints
the JWTs (NATS JWT v2: an ed25519-nkey signature over ``base64url(header).base64url(claims)``, the
type-specific claims under ``nats`` with ``type`` and ``version: 2``), and writes the server's
``operator`` / ``resolver: MEMORY`` / ``resolver_preload`` config block and the user's ``.creds`` file.
Written from the format's description in nats-io/jwt (v2/claims.go, account_claims.go, user_claims.go).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys

# nkeys role prefixes (the first letter of a public key: O, A, U).
_PREFIX = {"operator": nkeys.PREFIX_BYTE_OPERATOR, "account": nkeys.PREFIX_BYTE_ACCOUNT,
           "user": nkeys.PREFIX_BYTE_USER}
NO_LIMIT = -1
JWT_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}


@dataclass(frozen=True)
class NKey:
    """One identity: its role, seed (``S`` + role letter, the secret) and public key."""

    role: str
    seed: str
    public_key: str

    @classmethod
    def new(cls, role: str) -> NKey:
        seed = nkeys.encode_seed(os.urandom(32), _PREFIX[role])
        kp = nkeys.from_seed(bytearray(seed))
        return cls(role, seed.decode(), kp.public_key.decode())

    def sign(self, data: bytes) -> bytes:
        kp = nkeys.from_seed(bytearray(self.seed.encode()))
        return bytes(kp.sign(data))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _compact(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def encode_jwt(subject: str, name: str, nats: dict[str, Any], signer: NKey, *, expires: int = 0) -> str:
    """A signed v2 JWT for ``subject``. ``jti`` is the unpadded base32 of SHA-512/256 over the standard claims
    (without ``jti``), as nats-io/jwt computes it; the server only needs it unique."""
    std: dict[str, Any] = {}
    if expires:
        std["exp"] = expires
    std.update({"iat": int(time.time()), "iss": signer.public_key, "name": name, "sub": subject})
    jti = base64.b32encode(hashlib.new("sha512_256", _compact(std)).digest()).rstrip(b"=").decode()
    claims = {"jti": jti, **std, "nats": {**nats, "version": 2}}
    signing_input = f"{_b64url(_compact(JWT_HEADER))}.{_b64url(_compact(claims))}"
    return f"{signing_input}.{_b64url(signer.sign(signing_input.encode()))}"


def decode_claims(token: str) -> dict[str, Any]:
    """The claims part of a JWT (no verification: for assertions on what was minted)."""
    part = token.split(".")[1]
    out: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return out


def operator_jwt(op: NKey, *, system_account: str | None = None) -> str:
    nats: dict[str, Any] = {"type": "operator"}
    if system_account:
        nats["system_account"] = system_account
    return encode_jwt(op.public_key, "dyn-test-operator", nats, op)


def account_jwt(acct: NKey, op: NKey, name: str, *, jetstream: bool) -> str:
    """An account with no NATS limits; with ``jetstream`` it may also create streams (the tokenizer object
    store needs that). The system account must not have JetStream."""
    limits: dict[str, Any] = {"subs": NO_LIMIT, "data": NO_LIMIT, "payload": NO_LIMIT, "imports": NO_LIMIT,
                              "exports": NO_LIMIT, "wildcards": True, "conn": NO_LIMIT, "leaf": NO_LIMIT}
    if jetstream:
        limits.update({"mem_storage": NO_LIMIT, "disk_storage": NO_LIMIT, "streams": NO_LIMIT,
                       "consumer": NO_LIMIT})
    nats = {"limits": limits, "default_permissions": {"pub": {}, "sub": {}}, "type": "account"}
    return encode_jwt(acct.public_key, name, nats, op)


def user_jwt(user: NKey, acct: NKey, name: str, *, expires: int = 0) -> str:
    nats = {"pub": {}, "sub": {}, "subs": NO_LIMIT, "data": NO_LIMIT, "payload": NO_LIMIT, "type": "user"}
    return encode_jwt(user.public_key, name, nats, acct, expires=expires)


def creds_text(jwt: str, user: NKey) -> str:
    """A ``.creds`` file in the layout ``nsc`` writes and every NATS client reads."""
    return (f"-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n"
            "************************* IMPORTANT *************************\n"
            "NKEY Seed printed below can be used to sign and prove identity.\n"
            "NKEYs are sensitive and should be treated as secrets.\n\n"
            f"-----BEGIN USER NKEY SEED-----\n{user.seed}\n------END USER NKEY SEED------\n\n"
            "*************************************************************\n")


def write_private(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


@dataclass(frozen=True)
class Trust:
    """An operator with a system account and one application account (JetStream on), ready for a server."""

    operator: NKey
    system: NKey
    account: NKey
    operator_jwt: str
    system_jwt: str
    account_jwt: str

    @classmethod
    def new(cls) -> Trust:
        op, sys_acct, acct = NKey.new("operator"), NKey.new("account"), NKey.new("account")
        return cls(op, sys_acct, acct, operator_jwt(op, system_account=sys_acct.public_key),
                   account_jwt(sys_acct, op, "SYS", jetstream=False),
                   account_jwt(acct, op, "DYNAMO", jetstream=True))

    def server_config(self) -> str:
        """The nats-server config block: trust this operator, resolve accounts from memory."""
        return (f"operator: {self.operator_jwt}\n"
                f"system_account: {self.system.public_key}\n"
                "resolver: MEMORY\n"
                "resolver_preload: {\n"
                f"  {self.system.public_key}: {self.system_jwt}\n"
                f"  {self.account.public_key}: {self.account_jwt}\n"
                "}\n")

    def user_creds(self, name: str = "dynamo", *, expires: int = 0) -> tuple[NKey, str, str]:
        """A new user of the application account: (its key, its JWT, the .creds text)."""
        user = NKey.new("user")
        jwt = user_jwt(user, self.account, name, expires=expires)
        return user, jwt, creds_text(jwt, user)
