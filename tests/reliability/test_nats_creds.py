"""NATS decentralized auth end to end: a real nats-server in operator (JWT) mode, a frontend and a worker
that connect with a ``.creds`` file (``--nats-creds`` / ``DYN_NATS_CREDS``), ``dynamo-rt up`` passing it on,
and every bad file stopping a process at start with an error that names the problem and never the secret.

The operator, accounts and user, their JWTs and the creds file are made here (:mod:`tests.natsjwt`).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from dynamo_rt.errors import TransportError
from dynamo_rt.local.services import EtcdServer, NatsServer
from dynamo_rt.transport import NatsOptions, Transport, check_creds_file
from tests.conftest import arun
from tests.natsjwt import NKey, Trust, creds_text, decode_claims, user_jwt, write_private
from tests.reliability.helpers import MODEL
from tests.stack import ROOT, Stack, free_port, read_until_ready


@dataclass(frozen=True)
class Creds:
    path: Path
    user: NKey
    jwt: str


@pytest.fixture(scope="module")
def trust() -> Trust:
    return Trust.new()


@pytest.fixture(scope="module")
def jwt_nats(tmp_path_factory: pytest.TempPathFactory, trust: Trust) -> Iterator[NatsServer]:
    """nats-server trusting only ``trust``'s operator (JetStream on, for the tokenizer object store)."""
    with NatsServer(tmp_path_factory.mktemp("jwt-nats"), config=trust.server_config()) as srv:
        yield srv


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory, trust: Trust) -> Creds:
    user, jwt, text = trust.user_creds("dynamo")
    return Creds(write_private(tmp_path_factory.mktemp("creds") / "dynamo.creds", text), user, jwt)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _connz(nats: NatsServer) -> list[dict[str, object]]:
    with urllib.request.urlopen(f"{nats.monitor_url}/connz?auth=true", timeout=5) as r:
        conns: list[dict[str, object]] = json.loads(r.read())["connections"]
    return conns


def test_frontend_and_worker_serve_chat_with_a_creds_file(etcd_server: EtcdServer, jwt_nats: NatsServer,
                                                          trust: Trust, creds: Creds) -> None:
    # The server really demands a JWT: a client without one is refused.
    async def refused() -> str:
        with pytest.raises(TransportError) as err:
            await Transport(NatsOptions(servers=jwt_nats.url)).connect(timeout=2)
        return str(err.value)

    assert "Authorization Violation" in arun(refused(), 20)

    st = Stack(etcd_server.client_url, jwt_nats.url, "creds" + secrets.token_hex(3))
    st.env["DYN_LOG"] = "debug"  # the most a process ever logs: the seed and JWT must stay out even then
    st.env["DYN_NATS_CREDS"] = str(creds.path)  # the worker: the environment twin
    st.add_worker("mocker", "agg", "--speedup", "0")
    del st.env["DYN_NATS_CREDS"]
    st.start_frontend("--nats-creds", str(creds.path))  # the frontend: the flag
    logs, cmdlines = "", ""
    try:
        st.wait_ready(n_instances=1, timeout=90)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12,
                "temperature": 0}
        r = httpx.post(st.url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["usage"]["completion_tokens"] == 12 and out["choices"][0]["finish_reason"] == "length"
        client = openai.OpenAI(base_url=st.url + "/v1", api_key="unused", max_retries=0, timeout=30)
        stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=12, temperature=0, stream=True,
                                                stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == out["choices"][0]["message"]["content"]
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12

        # Both processes are in the server's books as the creds file's user, in the application account.
        ours = {str(c["name"]): c for c in _connz(jwt_nats) if str(c.get("name", "")).startswith(("frontend",
                                                                                                "worker-"))}
        assert set(ours) == {"frontend", "worker-mocker-agg"}, ours
        for c in ours.values():
            assert (c["authorized_user"], c["account"]) == (creds.user.public_key, trust.account.public_key), c
    finally:
        for p in [*st.workers, *([st.frontend] if st.frontend else [])]:
            logs += f"\n--- {p.name}\n" + p.output()
            cmdlines += _cmdline(p.pid) + "\n"
        st.stop()
    assert "frontend listening" in logs and "worker ready" in logs  # the logs were really read
    for value in (creds.user.seed, creds.jwt, creds.jwt.split(".")[2]):
        assert value not in logs and value not in cmdlines


@dataclass(frozen=True)
class BadCase:
    role: str  # "frontend" or "worker"
    text: str | None  # the creds file's content; None: no file at all
    expect: str  # what the error says, after "NATS credentials file <path>: " (or the server's words)


def _bad_cases(trust: Trust) -> tuple[dict[str, BadCase], list[str]]:
    """Each kind of bad creds file, and every seed and JWT in them (none may show up in any output)."""
    good_user, good_jwt, _ = trust.user_creds("good")
    other_user = NKey.new("user")
    stranger = Trust.new()  # an operator and account the server does not trust
    foreign_user, foreign_jwt, foreign_text = stranger.user_creds("stranger")
    expired_jwt = user_jwt(good_user, trust.account, "expired", expires=int(time.time()) - 60)
    jwt_only = creds_text(good_jwt, good_user).split("************")[0]
    cases = {
        "missing": BadCase("frontend", None, "not found"),
        "no-jwt": BadCase("worker", creds_text(good_jwt, good_user).replace("BEGIN NATS USER JWT", "BEGIN JWT"),
                          "no user JWT (a -----BEGIN NATS USER JWT----- block)"),
        "no-seed": BadCase("frontend", jwt_only, "no user nkey seed (a -----BEGIN USER NKEY SEED----- block)"),
        "wrong-seed": BadCase("worker", creds_text(good_jwt, other_user),
                              f"its nkey seed is not the key of its JWT's user {good_user.public_key}"),
        "expired": BadCase("frontend", creds_text(expired_jwt, good_user), "its user JWT expired at "),
        "untrusted": BadCase("worker", foreign_text, "Authorization Violation"),
    }
    values = [good_user.seed, other_user.seed, foreign_user.seed, good_jwt, foreign_jwt, expired_jwt]
    assert decode_claims(foreign_jwt)["sub"] == foreign_user.public_key
    return cases, values


def test_bad_creds_file_stops_the_process_at_start(tmp_path: Path, etcd_server: EtcdServer,
                                                   jwt_nats: NatsServer, trust: Trust) -> None:
    """A frontend or worker given a bad creds file exits non-zero at start, and its output names the file and
    the problem (or the server's refusal) without any seed or JWT; even with debug logging."""
    cases, values = _bad_cases(trust)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYN_")}
    env.update({"DYN_ETCD_ENDPOINTS": etcd_server.client_url, "DYN_NATS_ENDPOINTS": jwt_nats.url,
                "DYN_NAMESPACE": "badcreds", "DYN_LOG": "debug", "DYN_METRICS_PORT": "-1",
                "PYTHONUNBUFFERED": "1"})
    for name, case in cases.items():
        path = tmp_path / f"{name}.creds"
        if case.text is not None:
            write_private(path, case.text)
        argv = ([sys.executable, "-m", "frontend", "--http-host", "127.0.0.1", "--http-port", str(free_port())]
                if case.role == "frontend" else
                [sys.executable, "-m", "workers", "--engine", "mocker", "--model", "tiny"])
        proc = subprocess.Popen([*argv, "--nats-creds", str(path)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=60)  # the server's refusal takes the connect timeout (10 s)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        text = out.decode(errors="replace")
        assert proc.returncode != 0, (name, text[-2000:])
        if case.expect == "Authorization Violation":
            assert f"connecting to {jwt_nats.url}: NATS error Error: nats: 'Authorization Violation'" in text, \
                (name, text[-2000:])
        else:
            assert f"connecting to {jwt_nats.url}: NATS credentials file {path}: {case.expect}" in text, \
                (name, text[-2000:])
        for value in values:
            assert value not in text, f"{name}: a seed or JWT appears in the output"
        assert "worker ready" not in text and "frontend listening" not in text


def test_creds_file_checks_in_process(tmp_path: Path, jwt_nats: NatsServer, trust: Trust, creds: Creds,
                                      caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The transport's own checks, one by one (the cases a process start cannot show cheaply), each an
    immediate typed error with no secret in it or in any log record."""
    caplog.set_level(logging.DEBUG)
    good_user, good_jwt, good_text = trust.user_creds("checks")
    acct_seed_text = good_text.replace(good_user.seed, trust.account.seed)
    cases: dict[str, tuple[str | None, str]] = {
        "directory": (None, "is a directory"),
        "empty": ("", "no user JWT (a -----BEGIN NATS USER JWT----- block)"),
        "jwt-marker-last": ("-----BEGIN NATS USER JWT-----\n", "no user JWT (a -----BEGIN NATS USER JWT----- block)"),
        "account-seed": (acct_seed_text, "its nkey seed is not a user seed"),
        "short-seed": (good_text.replace(good_user.seed, good_user.seed[:10]), "its nkey seed is malformed"),
        "bad-claims": (good_text.replace(good_jwt, good_jwt.split(".")[0] + ".e30K!.sig"),
                       "its user JWT is malformed"),
        "claims-not-an-object": (good_text.replace(good_jwt, good_jwt.split(".")[0] + ".W10.sig"),
                                 "its user JWT is malformed"),
    }
    messages: list[str] = []
    for name, (text, expect) in cases.items():
        path = tmp_path / name
        if text is None:
            path.mkdir()
        else:
            write_private(path, text)
        with pytest.raises(TransportError) as err:
            check_creds_file(str(path))
        assert str(err.value) == f"NATS credentials file {path}: {expect}", name
        messages.append(str(err.value))
    if os.geteuid() != 0:  # root reads a 0000 file anyway
        unreadable = write_private(tmp_path / "unreadable", good_text)
        unreadable.chmod(0)
        with pytest.raises(TransportError, match=r": cannot be read \(Permission denied\)$"):
            check_creds_file(str(unreadable))

    good = write_private(tmp_path / "good.creds", good_text)
    check_creds_file(str(good))  # a well-formed file passes
    check_creds_file(str(creds.path))

    async def main() -> str:
        # Through Transport.connect: immediate (no connect attempt), the server named, no retry loop.
        t0 = time.monotonic()
        with pytest.raises(TransportError) as err:
            await Transport(NatsOptions(servers=jwt_nats.url, creds=str(tmp_path / "empty"))).connect(timeout=5)
        assert time.monotonic() - t0 < 1.0
        assert str(err.value) == (f"connecting to {jwt_nats.url}: NATS credentials file {tmp_path / 'empty'}: "
                                  "no user JWT (a -----BEGIN NATS USER JWT----- block)")
        # The good file connects and round-trips a message as its user.
        t = Transport(NatsOptions(servers=jwt_nats.url, creds=str(good), name="checks"))
        await t.connect(timeout=5)
        try:
            sub = await t.nc.subscribe("creds.echo")
            await t.nc.publish("creds.echo", b"ping")
            msg = await sub.next_msg(timeout=5)
            assert msg.data == b"ping"
        finally:
            await t.close()
        # Without the nkeys package a creds file cannot be used: say so instead of a retried import error.
        monkeypatch.setitem(sys.modules, "nkeys", None)
        with pytest.raises(TransportError) as err2:
            await Transport(NatsOptions(servers=jwt_nats.url, creds=str(good))).connect(timeout=5)
        monkeypatch.delitem(sys.modules, "nkeys")
        assert str(err2.value) == (f"connecting to {jwt_nats.url}: NATS credentials file {good}: the 'nkeys' "
                                   "package is needed to use it (pip install nkeys)")
        return f"{err.value}\n{err2.value}"

    messages.append(arun(main(), 30))
    text = "\n".join(messages) + "\n".join(r.getMessage() for r in caplog.records)
    assert "connected to NATS 127.0.0.1:" in text
    for value in (good_user.seed, good_jwt, trust.account.seed, creds.user.seed, creds.jwt):
        assert value not in text


def test_up_passes_the_creds_file_to_every_role(tmp_path: Path, etcd_server: EtcdServer, jwt_nats: NatsServer,
                                                creds: Creds) -> None:
    """``dynamo-rt up`` against external etcd + JWT NATS: DYN_NATS_CREDS reaches the frontend and the worker
    it starts (its children inherit the environment), the stack serves, and one SIGINT stops it."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYN_")}
    env.update({"DYN_ETCD_ENDPOINTS": etcd_server.client_url, "DYN_NATS_ENDPOINTS": jwt_nats.url,
                "DYN_NATS_CREDS": str(creds.path), "DYN_NAMESPACE": "upcreds", "DYN_METRICS_PORT": "-1",
                "PYTHONUNBUFFERED": "1"})
    proc = subprocess.Popen([sys.executable, "-m", "dynamo_rt", "up", "--engine", "mocker", "--http-port",
                             str(port), "--state-dir", str(tmp_path / "state"), "--", "--speedup", "0"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    rest = ""
    try:
        ready, lines = read_until_ready(proc, 120)
        assert ready == f"ready: http://127.0.0.1:{port} (model {MODEL})", "".join(lines)[-3000:]
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30,
                       json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 8
        names = {str(c.get("name")) for c in _connz(jwt_nats) if c.get("authorized_user") == creds.user.public_key}
        assert {"frontend", "worker-mocker-agg"} <= names, names
        os.killpg(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, rest[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not (tmp_path / "state").exists()  # no embedded etcd / nats-server was started
    out = "".join(lines) + rest
    assert creds.user.seed not in out and creds.jwt not in out
