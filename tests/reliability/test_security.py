"""Security end to end: TLS etcd + TLS NATS with credentials, the frontend's API key, and no secret in any
log. Certificates are made in the test (``trustme``); every server and process is real.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from dynamo_rt.discovery import Registry
from dynamo_rt.errors import DiscoveryError, NotFound, TransportError
from dynamo_rt.local.services import EtcdServer, NatsServer
from dynamo_rt.transport import NatsOptions, Transport
from tests.conftest import arun
from tests.reliability.helpers import MODEL, Certs, assert_openai_error, make_certs
from tests.stack import ROOT, Stack, free_port

# Distinctive values, so a grep over the logs cannot match anything else.
ETCD_PW = "etcdpw-" + secrets.token_hex(8)
NATS_PW = "natspw-" + secrets.token_hex(8)
NATS_TOKEN = "natstok-" + secrets.token_hex(8)
API_KEY = "sk-dyn-" + secrets.token_hex(12)
NATS_USER = "dynamo"
UNAUTHORIZED = {"error": {"message": "invalid or missing API key", "type": "authentication_error",
                          "param": None, "code": "invalid_api_key"}}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[EtcdServer]:
    """etcd over HTTPS that demands a client certificate, with auth on (user root)."""
    d = tmp_path_factory.mktemp("tls-etcd")
    with EtcdServer(d, tls=certs.server_tls(verify_clients=True), root_password=ETCD_PW) as srv:
        yield srv


@pytest.fixture(scope="module")
def tls_nats(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[NatsServer]:
    """nats-server over TLS with a user and password (JetStream on, for the tokenizer object store)."""
    d = tmp_path_factory.mktemp("tls-nats")
    with NatsServer(d, tls=certs.server_tls(), user=NATS_USER, password=NATS_PW) as srv:
        yield srv


def secure_env(certs: Certs) -> dict[str, str]:
    """Every credential through its environment twin (what a Kubernetes Secret would set)."""
    return {"DYN_ETCD_CA": str(certs.ca), "DYN_ETCD_CERT": str(certs.client_cert),
            "DYN_ETCD_KEY": str(certs.client_key), "DYN_ETCD_USER": "root", "DYN_ETCD_PASSWORD": ETCD_PW,
            "DYN_NATS_CA": str(certs.ca), "DYN_NATS_USER": NATS_USER, "DYN_NATS_PASSWORD": NATS_PW,
            "DYN_API_KEY": API_KEY}


def test_tls_stack_serves_chat_with_api_key_and_logs_no_secret(tls_etcd: EtcdServer, tls_nats: NatsServer,
                                                               certs: Certs) -> None:
    assert tls_etcd.client_url.startswith("https://") and tls_nats.url.startswith("tls://")
    st = Stack(tls_etcd.client_url, tls_nats.url, "sec")
    st.env.update(secure_env(certs))
    st.env["DYN_LOG"] = "debug"  # the most a process ever logs: secrets must stay out even then
    st.add_worker("mocker", "agg", "--speedup", "0")
    st.start_frontend()
    logs = ""
    try:
        st.wait_ready(n_instances=1, timeout=90)
        url = st.url
        # The right key: the OpenAI SDK (Bearer header) gets its answer over TLS etcd + TLS NATS.
        client = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=30)
        chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=12, temperature=0)
        assert chat.choices[0].finish_reason == "length" and chat.usage is not None
        assert chat.usage.completion_tokens == 12
        stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=12, temperature=0, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == chat.choices[0].message.content
        assert [m.id for m in client.models.list().data] == [MODEL]

        # Missing, wrong, or malformed keys: 401 with the OpenAI error body, on every /v1 route.
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        bad_headers: list[dict[str, str]] = [
            {}, {"authorization": "Bearer wrong"}, {"authorization": f"Bearer {API_KEY}x"},
            {"authorization": API_KEY}, {"authorization": f"Basic {API_KEY}"}, {"authorization": "Bearer"},
            {"authorization": f"Bearer {API_KEY[:-1]}"},
        ]
        for h in bad_headers:
            r = httpx.post(url + "/v1/chat/completions", json=body, headers=h, timeout=10)
            assert r.status_code == 401 and r.json() == UNAUTHORIZED, (h, r.status_code, r.text)
            assert_openai_error(r.json())
        for path in ("/v1/models", f"/v1/models/{MODEL}"):
            r = httpx.get(url + path, timeout=10)
            assert (r.status_code, r.json()) == (401, UNAUTHORIZED)
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2},
                       timeout=10)
        assert (r.status_code, r.json()) == (401, UNAUTHORIZED)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0).models.list()
        # The key is case-sensitive; the scheme word is not (RFC 7235).
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=10,
                       headers={"authorization": f"bearer {API_KEY}"})
        assert r.status_code == 200, r.text
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=10,
                       headers={"authorization": f"Bearer {API_KEY.upper()}"})
        assert r.status_code == 401

        # Probes stay open.
        live = httpx.get(url + "/live", timeout=10)
        assert (live.status_code, live.json()) == (200, {"status": "live"})
        health = httpx.get(url + "/health", timeout=10)
        assert health.status_code == 200 and health.json()["models"][MODEL]["instances"] == 1
    finally:
        for p in [*st.workers, *([st.frontend] if st.frontend else [])]:
            logs += f"\n--- {p.name}\n" + p.output()
        server_cmdlines = [_cmdline(tls_etcd.pid), _cmdline(tls_nats.pid)]
        worker_cmdlines = [_cmdline(p.pid) for p in st.workers]
        st.stop()
    assert "frontend listening" in logs and "worker ready" in logs  # the logs were really read
    for name, secret in (("etcd password", ETCD_PW), ("NATS password", NATS_PW), ("API key", API_KEY)):
        assert secret not in logs, f"the {name} appears in a process log"
        for cmd in server_cmdlines + worker_cmdlines:
            assert secret not in cmd, f"the {name} is on a command line: {cmd}"


def _cmdline(pid: int | None) -> str:
    if pid is None:
        return ""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_credentials_refused_quickly_and_clearly(tls_etcd: EtcdServer, tls_nats: NatsServer, certs: Certs,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Wrong or missing credentials end in a typed error within the connect timeout (no hang, no retry
    forever), and neither the error nor any log line carries the secret that was tried."""
    caplog.set_level(logging.DEBUG)

    async def main() -> list[str]:
        messages: list[str] = []
        nats_cases = [
            NatsOptions(servers=tls_nats.url, user=NATS_USER, password=NATS_PW + "x", ca=str(certs.ca)),
            NatsOptions(servers=tls_nats.url, ca=str(certs.ca)),  # no credentials
            NatsOptions(servers=tls_nats.url, user=NATS_USER, password=NATS_PW, ca=str(certs.other_ca)),
        ]
        for opts in nats_cases:
            t = Transport(opts)
            t0 = time.monotonic()
            with pytest.raises(TransportError) as err:
                await t.connect(timeout=2)
            assert time.monotonic() - t0 < 6
            messages.append(str(err.value))
        assert "Authorization Violation" in messages[0] and "Authorization Violation" in messages[1]

        etcd_cases = [
            dict(user="root", password=ETCD_PW + "x", ca=certs.ca, cert=certs.client_cert, key=certs.client_key),
            dict(user="root", password=ETCD_PW, ca=certs.ca),  # no client certificate
            dict(user="root", password=ETCD_PW, ca=certs.other_ca, cert=certs.client_cert,
                 key=certs.client_key),
        ]
        for kw in etcd_cases:
            reg = Registry(tls_etcd.client_url, "sec2", connect_timeout=2, **kw)  # type: ignore[arg-type]
            t0 = time.monotonic()
            with pytest.raises(DiscoveryError) as derr:
                await reg.start()
            assert time.monotonic() - t0 < 8
            messages.append(str(derr.value))
        assert "authentication failed" in messages[3]
        # And the right ones work: a put and a read over mutual TLS with a password.
        async with Registry(tls_etcd.client_url, "sec2", user="root", password=ETCD_PW, ca=certs.ca,
                            cert=certs.client_cert, key=certs.client_key) as reg:
            await reg.put("/sec2/k", b"v")
            assert (await reg.get_prefix("/sec2/"))[0] == {"/sec2/k": b"v"}
        return messages

    messages = arun(main(), 90)
    text = "\n".join(messages) + "\n".join(r.getMessage() for r in caplog.records)
    for secret in (ETCD_PW, NATS_PW):
        assert secret not in text


def test_nats_token_and_credentials_in_the_url(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Token auth works; credentials written into the server URL work and are redacted in logs/errors."""
    caplog.set_level(logging.DEBUG)
    with NatsServer(tmp_path / "tok", jetstream=False, token=NATS_TOKEN) as tok, \
            NatsServer(tmp_path / "pw", jetstream=False, user=NATS_USER, password=NATS_PW) as pw:

        async def main() -> str:
            t = Transport(NatsOptions(servers=tok.url, token=NATS_TOKEN))
            await t.connect(timeout=5)
            await t.close()
            with pytest.raises(TransportError) as e1:
                await Transport(NatsOptions(servers=tok.url, token=NATS_TOKEN[:-1])).connect(timeout=1)
            in_url = f"nats://{NATS_USER}:{NATS_PW}@127.0.0.1:{pw.port}"
            t = Transport(in_url)
            await t.connect(timeout=5)
            await t.close()
            with pytest.raises(TransportError) as e2:
                await Transport(f"nats://{NATS_USER}:{NATS_PW}@127.0.0.1:{free_port()}").connect(timeout=1)
            assert f"nats://127.0.0.1:{pw.port}" not in str(e2.value)
            return f"{e1.value}\n{e2.value}"

        errors_text = arun(main(), 30)
    text = errors_text + "\n".join(r.getMessage() for r in caplog.records)
    assert "connected to NATS 127.0.0.1:" in text
    assert NATS_PW not in text and NATS_TOKEN not in text and NATS_TOKEN[:-1] not in text


def test_credentials_in_endpoint_urls_are_not_logged(tls_nats: NatsServer, tls_etcd: EtcdServer,
                                                     certs: Certs) -> None:
    env = dict(os.environ)
    env.update(secure_env(certs))
    del env["DYN_NATS_USER"], env["DYN_NATS_PASSWORD"]
    env.update({"DYN_NATS_ENDPOINTS": f"tls://{NATS_USER}:{NATS_PW}@127.0.0.1:{tls_nats.port}",
                "DYN_ETCD_ENDPOINTS": tls_etcd.client_url, "DYN_NAMESPACE": "sec3", "PYTHONUNBUFFERED": "1"})
    proc = subprocess.Popen([sys.executable, "-m", "frontend", "--http-host", "127.0.0.1", "--http-port",
                             str(free_port())], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    out = b""
    try:
        deadline = time.monotonic() + 30
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        while b"frontend listening" not in out and time.monotonic() < deadline and proc.poll() is None:
            out += proc.stdout.read() or b""
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(10)
    text = out.decode(errors="replace")
    assert "frontend listening" in text, text[-3000:]
    assert NATS_PW not in text


def test_worker_connects_to_nats_requiring_client_certificates(tmp_path: Path, tls_etcd: EtcdServer,
                                                               certs: Certs) -> None:
    with NatsServer(tmp_path / "mtls-nats", tls=certs.server_tls(verify_clients=True)) as nats:
        env = dict(os.environ)
        env.update(secure_env(certs))
        del env["DYN_NATS_USER"], env["DYN_NATS_PASSWORD"]
        env.update({"DYN_NATS_CERT": str(certs.client_cert), "DYN_NATS_KEY": str(certs.client_key),
                    "DYN_NATS_ENDPOINTS": nats.url, "DYN_ETCD_ENDPOINTS": tls_etcd.client_url,
                    "DYN_NAMESPACE": "sec4", "DYN_METRICS_PORT": "-1", "PYTHONUNBUFFERED": "1"})
        log_path = tmp_path / "worker.log"
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen([sys.executable, "-m", "workers", "--engine", "mocker", "--model", "tiny"],
                                    env=env, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            deadline = time.monotonic() + 40
            while "worker ready" not in log_path.read_text() and time.monotonic() < deadline:
                if proc.poll() is not None:
                    break
                time.sleep(0.2)
        finally:
            os.killpg(proc.pid, 15)
            proc.wait(15)
        assert "worker ready" in log_path.read_text(), log_path.read_text()[-2000:]


def test_object_store_read_of_a_replaced_object_is_bounded(nats_server: NatsServer) -> None:
    """Workers of one model all put the same tokenizer objects; a put that replaces an object purges the
    old chunks, and a frontend reading it at that moment must get an answer or an error, not wait forever.
    Here the chunks are purged by hand between the object's meta read and its chunk read."""

    async def main() -> None:
        t = Transport(nats_server.url)
        await t.connect()
        try:
            bucket = "rel-" + secrets.token_hex(4)
            await t.put_object(bucket, "tokenizer.json", b"x" * 200_000)
            js = t.nc.jetstream()
            obs = await js.object_store(bucket)
            info = await obs.get_info("tokenizer.json")
            await js.purge_stream(f"OBJ_{bucket}", subject=f"$O.{bucket}.C.{info.nuid}")
            try:
                await asyncio.wait_for(t.get_object(bucket, "tokenizer.json", timeout=2), 15)
            except (NotFound, TransportError):
                pass  # a typed error is a fine answer
        finally:
            await t.close()

    arun(main(), 40)
