"""Shared helpers of the serving benches (``frontend_overhead.py``, ``kv_routing.py``); not a bench itself.

What lives here:
* process handling: :class:`Proc` (a :class:`dynamo_rt.local.harness.Child`: its own process group, log to a
  file, stopped by PID),
  :class:`Services` (our embedded etcd + nats-server on loopback), :func:`cpu_seconds` (user+sys CPU of a
  process and its descendants, from ``/proc/<pid>/stat``);
* serving stacks: :func:`start_stack` starts fresh services, one mocker worker process and a frontend,
  ours or NVIDIA Dynamo's, and waits until the model (and ``instances`` workers) are served;
* the load generator: raw asyncio streams with a hand-written HTTP/1.1 request (one new connection per
  request, ``Connection: close``) so the client costs little CPU. It runs in its own process
  (:func:`run_load` starts ``python bench/_common.py loadgen SPEC OUT``) so its CPU never shows up in the
  frontend's numbers. A workload is a list of *sessions*; a session's requests run one after the other
  (multi-turn chat), ``concurrency`` sessions run at once (closed loop), or each session starts at its own
  time (open loop: ``arrivals``, seconds from the start, e.g. a Poisson process);
* NVIDIA Dynamo's own venv (:func:`ensure_dynamo_venv`): ``ai-dynamo-runtime`` + ``ai-dynamo`` 1.6.1 from
  PyPI, outside the repository (``~/.cache/dynamo-rt/bench/dynamo-venv``, or ``$DYN_BENCH_DYNAMO_VENV``);
* statistics and table printing (:func:`pct`, :func:`summarize`, :func:`table`).

Run directly with no arguments it does nothing (``make bench`` runs every ``bench/*.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # also when run as a script (the load generator)
    sys.path.insert(0, str(ROOT))

from dynamo_rt.local import commands, harness  # noqa: E402
from dynamo_rt.local.harness import Child, wait_http  # noqa: E402
from dynamo_rt.local.services import free_port  # noqa: E402

OUT_DIR = ROOT / "bench" / "out"  # git-ignored: logs, plots, profiles
PY = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable

DYNAMO_VERSION = "1.6.1"
DYNAMO_VENV = Path(os.environ.get("DYN_BENCH_DYNAMO_VENV", "~/.cache/dynamo-rt/bench/dynamo-venv")).expanduser()
# ai-dynamo's own requirements minus aisimulate (not on the index, only used by the AIS perf model).
DYNAMO_DEPS = [
    "aiohttp",
    "msgspec",
    "prometheus-client",
    "pyzmq",
    "transformers",
    "kubernetes>=32.0.1,<33",
    "redis",
    "tqdm",
    "zstandard",
    "pydantic>=2.10.6,<=2.13.5",
]
CLK_TCK = os.sysconf("SC_CLK_TCK")

_t0 = time.monotonic()


def say(msg: str) -> None:
    """A progress line (benches take minutes; the reader wants to see them move)."""
    print(f"[{time.monotonic() - _t0:7.1f}s] {msg}", flush=True)


# --------------------------------------------------------------------------------------------- processes



def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, or None (said once) where matplotlib is missing
    (it is in the ``bench`` extra: ``pip install -e '.[bench]'``, which ``make bench`` does)."""
    try:
        import matplotlib
    except ImportError:
        say("matplotlib not installed (pip install -e '.[bench]'): no plot")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_plot(fig: Any, name: str) -> Path:
    """Lay out ``fig`` and write it to bench/out/<name>.png (git-ignored); says where."""
    fig.tight_layout()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{name}.png"
    fig.savefig(path, dpi=110)
    say(f"plot: {path}")
    return path


def plot_bars(name: str, title: str, groups: dict[str, dict[str, float]], ylabel: str) -> Path | None:
    """Grouped bars (one group per x label, one bar per series: ``{"batch 8": {"ours": 9e3, "baseline":
    3e3}}``) saved as bench/out/<name>.png; None without matplotlib. For benches whose table is a few
    numbers side by side."""
    plt = pyplot()
    if plt is None or not groups:
        return None
    series = list(dict.fromkeys(k for g in groups.values() for k in g))
    fig, ax = plt.subplots(figsize=(min(10.0, max(4.0, 0.9 * len(groups) * max(1, len(series)) ** 0.5 + 2)), 3.6))
    width = 0.8 / max(1, len(series))
    for i, sname in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(groups))]
        ax.bar(xs, [g.get(sname, 0.0) for g in groups.values()], width, label=sname)
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if len(series) > 1:
        ax.legend(fontsize=7)
    return save_plot(fig, name)


# --------------------------------------------------------------------------------------------- machine


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    out: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            k, _, v = line.partition(":")
            out[k.strip()] = v.strip()
    return out


def machine_info(native: bool = False, threads: int | None = None) -> dict[str, Any]:
    """What ran the bench: CPU model (with family/model numbers: a hypervisor may show only "AMD EPYC"),
    usable cores (this process's affinity) of those online, the widest x86 vector ISA, and with ``native``
    the reference engine's native decode kernel (:func:`workers.reference.native.kernel_info`: compiler,
    flags, what ``-march=native`` resolved to, vector width) and its thread count (``threads``, default the
    engine's: usable cores minus one). ``native=False`` (the bench runs no reference engine on the CPU):
    ``"native": None``."""
    import platform

    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    isa = next((f for f in ("avx512f", "avx2", "avx") if f in flags), platform.machine())
    cpu = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info and "model" in info:
        cpu += f" (family {info['cpu family']} model {info['model']})"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    out: dict[str, Any] = {"cpu": cpu, "cores": usable, "online": os.cpu_count() or usable,
                           "isa": isa.replace("avx512f", "avx512"), "native": None}
    if native:
        from workers.reference.native import kernel_info

        out["native"] = {**kernel_info(), "threads": threads or max(1, usable - 1)}
    return out


def machine_line(info: dict[str, Any]) -> str:
    """One printable line of :func:`machine_info`."""
    line = f"machine: {info['cpu']}, {info['cores']} usable cores of {info['online']}, {info['isa']}"
    k = info.get("native")
    if not k:
        return line + "; native decode kernel: not used"
    if not k.get("vector_bits"):
        return line + f"; native decode kernel: unavailable (torch operators), {k['threads']} thread(s)"
    return (line + f"; native decode kernel: {k['cc']}, {k['flags']} (native = {k['march_native']}), "
            f"{k['vector_bits']}-bit vectors, {k['threads']} thread(s)")


def report(result: dict[str, Any], native: bool = False, threads: int | None = None) -> dict[str, Any]:
    """Print the machine line, then ``result`` with ``"machine"`` added as the bench's LAST line (one JSON
    object); returns it. ``make bench`` keeps that line in bench/out/results.jsonl for bench/report.py."""
    info = machine_info(native, threads)
    print(machine_line(info))
    out = {**result, "machine": info}
    print(json.dumps(out), flush=True)
    return out

def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            f = _stat_fields(int(d))
            if f is not None:
                children.setdefault(int(f[1]), []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (all its threads) and of its live descendants."""
    total = 0
    for p in [pid, *descendants(pid)]:
        f = _stat_fields(p)
        if f is not None:
            total += int(f[11]) + int(f[12])  # utime, stime (fields 14, 15 of stat)
    return total / CLK_TCK


def exit_on_sigterm() -> None:
    """SIGTERM (``timeout``, a CI runner) unwinds like Ctrl-C, so every ``finally`` stops its children."""

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)


def host_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, all cores (``/proc/stat``)."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(v[:8])  # guest time is already inside user/nice
    return total - v[3] - v[4], total


def cpus_jiffies() -> dict[int, tuple[int, int]]:
    """(busy, total) jiffies per core (``/proc/stat``'s ``cpuN`` lines)."""
    out: dict[int, tuple[int, int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *vals = line.split()
            v = [int(x) for x in vals]
            total = sum(v[:8])
            out[int(name[3:])] = (total - v[3] - v[4], total)
    return out


def host_busy(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Fraction of all cores busy between two :func:`host_cpu` readings (other tenants included)."""
    return (after[0] - before[0]) / max(1, after[1] - before[1])


class Proc(Child):
    """A child of the bench (:class:`dynamo_rt.local.harness.Child`: its own process group, killed if the bench
    dies without stopping it), run from the repository root, output to ``OUT_DIR/logs/<name>.log``."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], cwd: Path | None = None) -> None:
        log = OUT_DIR / "logs" / f"{name}.log"
        log.unlink(missing_ok=True)  # this run's output only
        super().__init__(name, argv, env=env, cwd=cwd or ROOT, log=log)

    def tail(self, n: int = 40) -> str:
        return self.log_tail(n)


class Services:
    """Our embedded etcd + nats-server (``dynamo_rt.local.services.LocalServices``) in a temporary folder."""

    def __init__(self) -> None:
        from dynamo_rt.local.services import EtcdServer, LocalServices

        # Throwaway state in memory when possible, and etcd without fsync: on a shared machine a disk stall
        # would otherwise expire every lease at once and show up as a routing failure.
        shm = Path("/dev/shm")
        self._tmp = tempfile.TemporaryDirectory(prefix="dyn-bench-", dir=shm if shm.is_dir() else None)
        self.local = LocalServices(Path(self._tmp.name))
        self.local.etcd = EtcdServer(Path(self._tmp.name) / "etcd", extra_args=["--unsafe-no-fsync"])

    def __enter__(self) -> Services:
        self.local.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.local.stop()
        self._tmp.cleanup()

    @property
    def etcd_url(self) -> str:
        return self.local.etcd.client_url

    @property
    def nats_url(self) -> str:
        return self.local.nats.url

    def pids(self) -> list[int]:
        return [p for p in (self.local.etcd.pid, self.local.nats.pid) if p is not None]


def http_json(url: str, timeout: float = 2.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        body = e.read()
        with contextlib.suppress(ValueError):
            return e.code, json.loads(body or b"null")
        return e.code, None


def wait_model(base_url: str, model: str, procs: Sequence[Proc], timeout: float = 180.0) -> None:
    """Until ``/v1/models`` lists ``model``; fail fast if one of ``procs`` exits."""
    wait_http(base_url + "/v1/models", procs,
              lambda status, body: status == 200 and any(m.get("id") == model for m in body.get("data", [])),
              timeout, f"serving {model} at {base_url}")


def stop_all(procs: Sequence[Proc]) -> None:
    """Stop every process together (SIGTERM, SIGKILL after 10 s), newest first."""
    harness.stop_all(procs)


def ready_instances(url: str, dynamo: bool) -> int:
    """Worker instances a frontend's ``/health`` reports (ours: per model; Dynamo: ``generate`` endpoints)."""
    status, body = http_json(url + "/health")
    if status != 200 or not isinstance(body, dict):
        return 0
    if dynamo:
        return sum(1 for i in body.get("instances", []) if i.get("endpoint") == "generate")
    return harness.health_instances(status, body)


def wait_instances(url: str, model: str, n: int, dynamo: bool, procs: Sequence[Proc],
                   timeout: float = 180.0) -> None:
    """Until ``model`` is listed and ``n`` worker instances are ready; fail fast if one of ``procs`` exits."""
    wait_model(url, model, procs, timeout)
    if n > 0:
        harness.wait_until(lambda: ready_instances(url, dynamo) >= n, procs, timeout, f"{n} workers at {url}")


DYNAMO_PLANES = ["--discovery-backend", "etcd", "--request-plane", "nats", "--event-plane", "nats"]


class Stack:
    """One worker process + one frontend on their own etcd + NATS (:func:`start_stack`); a context manager
    that stops everything, frontend first."""

    def __init__(self, name: str, services: Services, frontend: Proc, worker: Proc, url: str) -> None:
        self.name, self.services, self.frontend, self.worker, self.url = name, services, frontend, worker, url

    @property
    def procs(self) -> list[Proc]:
        """Worker, then frontend (the order their CPU is reported in)."""
        return [self.worker, self.frontend]

    def stop(self) -> None:
        stop_all(self.procs)
        self.services.__exit__(None, None, None)

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_stack(
    kind: str,
    model_dir: str,
    model: str,
    *,
    tag: str,
    name: str | None = None,
    router: str = "round-robin",
    worker_args: Sequence[str] = (),
    frontend_args: Sequence[str] = (),
    namespace: str = "bench",
    instances: int = 0,
    frontend_root: Path | None = None,
) -> Stack:
    """Fresh etcd + NATS, a mocker worker process and a frontend, ours (``kind="ours"``) or NVIDIA Dynamo's
    (``"dynamo"``: its venv, etcd discovery, NATS request and event planes), serving ``model_dir`` as
    ``model``. ``worker_args`` / ``frontend_args`` are added to the mocker's / frontend's command line;
    logs go to ``OUT_DIR/logs/{tag}-worker.log`` and ``{tag}-frontend.log``. Returns once the model is
    listed and, with ``instances``, that many workers are ready; on failure everything is stopped.
    ``frontend_root``: run our frontend from this source tree instead (an A/B against another commit)."""
    dyn = kind == "dynamo"
    s = Services().__enter__()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if dyn:
        py = ensure_dynamo_venv()
        env = dynamo_env(s.etcd_url, s.nats_url)
        worker = [py, "-m", "dynamo.mocker", "--model-path", model_dir, "--model-name", model, *worker_args,
                  *DYNAMO_PLANES]  # fmt: skip
        front = [py, "-m", "dynamo.frontend", "--http-host", "127.0.0.1", "--http-port", str(port),
                 "--router-mode", router, *frontend_args, *DYNAMO_PLANES]  # fmt: skip
    else:
        env = ours_env(s.etcd_url, s.nats_url, namespace)
        worker = commands.worker("mocker", "agg", model_dir, served_model_name=model, extra=worker_args, python=PY)
        front = commands.frontend(port, router_mode=router, extra=frontend_args, python=PY)
    procs: list[Proc] = []
    try:
        procs.append(Proc(f"{tag}-worker", worker, env))
        if frontend_root is not None:
            fenv = {**env, "PYTHONPATH": str(frontend_root)}
            procs.append(Proc(f"{tag}-frontend", front, fenv, cwd=frontend_root))
        else:
            procs.append(Proc(f"{tag}-frontend", front, env))
        wait_instances(url, model, instances, dyn, procs)
    except BaseException:
        stop_all(procs)
        s.__exit__(None, None, None)
        raise
    return Stack(name or tag, s, procs[1], procs[0], url)


# --------------------------------------------------------------------------------------------- Dynamo


def dynamo_python() -> str:
    return str(DYNAMO_VENV / "bin" / "python")


def ensure_dynamo_venv() -> str:
    """Python of a venv holding NVIDIA Dynamo ``DYNAMO_VERSION``; created on first use (a few minutes)."""
    py = dynamo_python()
    check = [
        py,
        "-c",
        "import dynamo.frontend.main, dynamo.mocker.main, dynamo.llm; "
        "from importlib.metadata import version; print(version('ai-dynamo'))",
    ]
    if Path(py).exists():
        r = subprocess.run(check, capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip() == DYNAMO_VERSION:
            return py
    say(f"installing NVIDIA Dynamo {DYNAMO_VERSION} into {DYNAMO_VENV} (one time)")
    DYNAMO_VENV.parent.mkdir(parents=True, exist_ok=True)
    if not Path(py).exists():
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(DYNAMO_VENV)], check=True)
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    steps = [[f"ai-dynamo-runtime=={DYNAMO_VERSION}"], ["--no-deps", f"ai-dynamo=={DYNAMO_VERSION}"], DYNAMO_DEPS]
    for i, step in enumerate(steps, 1):
        say(f"  pip install {' '.join(step)}  ({i}/{len(steps)})")
        subprocess.run([*pip, *step], check=True)
    r = subprocess.run(check, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"Dynamo venv at {DYNAMO_VENV} is not usable:\n{r.stderr[-2000:]}")
    say(f"  ai-dynamo {r.stdout.strip()} ready")
    return py


def dynamo_env(etcd_url: str, nats_url: str) -> dict[str, str]:
    """Environment of a Dynamo process on our loopback etcd + NATS."""
    env = dict(os.environ)
    for k in list(env):  # our own DYN_* settings mean other things to Dynamo
        if k.startswith("DYN_"):
            del env[k]
    env.update(
        {
            "ETCD_ENDPOINTS": etcd_url,
            "NATS_SERVER": nats_url,
            "DYN_TCP_RPC_HOST": "127.0.0.1",
            "DYN_EVENT_PLANE_HOST": "127.0.0.1",
            "DYN_TCP_RESPONSE_STREAM_HOST": "127.0.0.1",
            "DYN_LOG": "warn",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def ours_env(etcd_url: str, nats_url: str, namespace: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "DYN_ETCD_ENDPOINTS": etcd_url,
            "DYN_NATS_ENDPOINTS": nats_url,
            "DYN_NAMESPACE": namespace,
            "DYN_LOG": "warning",
            "PYTHONUNBUFFERED": "1",
            "DYN_METRICS_PORT": "-1",
        }
    )
    return env


# --------------------------------------------------------------------------------------------- statistics


def pct(xs: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; NaN for no data."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], first_width: int = 30) -> str:
    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    widths = [first_width] + [max(12, len(h) + 2) for h in headers[1:]]

    def line(cells: Sequence[str]) -> str:
        return "".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    return "\n".join([line(headers), *(line([cell(v) for v in r]) for r in rows)])


@dataclass
class LoadResult:
    """Per-request records of one load run plus the wall time and the client's own CPU."""

    records: list[dict[str, Any]]
    wall_s: float
    client_cpu_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    def ok(self, max_tokens: int | None = None) -> list[dict[str, Any]]:
        return [
            r
            for r in self.records
            if r["status"] == 200
            and r["done"]
            and r["error"] is None
            and (max_tokens is None or r["completion_tokens"] == max_tokens)
        ]

    def summary(self, max_tokens: int | None = None) -> dict[str, float]:
        ok = self.ok(max_tokens)
        ttft = [r["ttft_ms"] for r in ok if r["ttft_ms"] is not None]
        prompt = sum(r["prompt_tokens"] for r in ok)
        cached = sum(r["cached_tokens"] for r in ok)
        out = sum(r["completion_tokens"] for r in ok)
        return {
            "requests": len(self.records),
            "ok": len(ok),
            "errors": len(self.records) - len(ok),
            "req_s": len(ok) / self.wall_s if self.wall_s else 0.0,
            "tok_s": out / self.wall_s if self.wall_s else 0.0,
            "ttft_p50": pct(ttft, 0.5),
            "ttft_p99": pct(ttft, 0.99),
            "lat_p50": pct([r["latency_ms"] for r in ok], 0.5),
            "itl_p50": pct([g for r in ok for g in r.get("gaps_ms", ())], 0.5),
            "itl_p99": pct([g for r in ok for g in r.get("gaps_ms", ())], 0.99),
            "hit_rate": cached / prompt if prompt else 0.0,
            "prompt_tokens": prompt,
            "cached_tokens": cached,
            "events_per_req": sum(r["events"] for r in ok) / len(ok) if ok else 0.0,
            "text_events_per_req": sum(r.get("text_events", 0) for r in ok) / len(ok) if ok else 0.0,
            "client_cpu_ms_per_req": 1000 * self.client_cpu_s / max(1, len(self.records)),
        }

    def error_samples(self, n: int = 3, max_tokens: int | None = None) -> list[str]:
        good = {id(r) for r in self.ok(max_tokens)}
        bad = [r for r in self.records if id(r) not in good]
        return [
            f"status={r['status']} done={r['done']} tokens={r['completion_tokens']} error={r['error']}" for r in bad[:n]
        ]


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Start times (s) of ``n`` sessions arriving as a Poisson process of ``rate`` sessions/s; the first at 0.
    Seeded apart from the workload, so every router and both stacks get the same schedule."""
    rng = random.Random(f"arrivals-{seed}")
    out, t = [], 0.0
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def run_load(
    base_url: str,
    sessions: Sequence[Sequence[bytes]],
    concurrency: int,
    *,
    path: str = "/v1/chat/completions",
    timeout: float = 120.0,
    arrivals: Sequence[float] | None = None,
) -> LoadResult:
    """Run ``sessions`` against ``base_url`` from a separate load-generator process: ``concurrency`` at once
    (closed loop), or, with ``arrivals`` (one start time per session, seconds from the start of the run),
    each session when its time comes, however many are in flight (open loop; ``concurrency`` unused)."""
    if arrivals is not None and len(arrivals) != len(sessions):
        raise ValueError("arrivals needs one start time per session")
    host, port = base_url.removeprefix("http://").split(":")
    with tempfile.TemporaryDirectory(prefix="dyn-load-") as d:
        spec = {
            "host": host,
            "port": int(port),
            "path": path,
            "concurrency": concurrency,
            "timeout": timeout,
            "sessions": [[b.decode() for b in s] for s in sessions],
            "arrivals": None if arrivals is None else list(arrivals),
        }
        (Path(d) / "spec.json").write_text(json.dumps(spec))
        r = subprocess.run([PY, __file__, "loadgen", str(Path(d) / "spec.json"), str(Path(d) / "out.json")], cwd=ROOT)
        if r.returncode != 0:
            raise RuntimeError(f"load generator failed with code {r.returncode}")
        out = json.loads((Path(d) / "out.json").read_text())
    return LoadResult(out["records"], out["wall_s"], out["client_cpu_s"])


# --------------------------------------------------------------------------------------------- load generator
# Everything below runs in the load-generator process.

# A delta that carries text: "content":"<not a closing quote> (chat) or "text":"... (completions).
_DELTA = re.compile(rb'"(?:content|text)":"(?!")')
_USAGE = re.compile(rb'"usage":\{')


async def _request(host: str, port: int, path: str, body: bytes, timeout: float) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "status": 0,
        "ttft_ms": None,
        "latency_ms": None,
        "done": False,
        "error": None,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "cached_tokens": 0,
        "events": 0,
        "text_events": 0,  # events whose delta carries text: tokens / text_events = tokens per event
        "finish_reason": None,
        "gaps_ms": [],  # time between the socket reads that brought data after the first text (inter-token)
    }
    t0 = last_read = time.perf_counter()
    writer = None
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(
            b"POST " + path.encode() + b" HTTP/1.1\r\nHost: " + host.encode() + b"\r\n"
            b"Content-Type: application/json\r\nAccept: text/event-stream\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        lines = head.split(b"\r\n")
        rec["status"] = int(lines[0].split()[1])
        headers = {}
        for ln in lines[1:]:
            if b":" in ln:
                k, v = ln.split(b":", 1)
                headers[k.strip().lower()] = v.strip().lower()
        chunked = headers.get(b"transfer-encoding") == b"chunked"
        length = int(headers[b"content-length"]) if b"content-length" in headers else None
        raw = bytearray()
        data = bytearray()
        pos = 0  # parse position in raw (chunked)
        scanned = 0
        finished = False
        while not finished:
            piece = await asyncio.wait_for(reader.read(65536), timeout)
            if not piece:
                break
            if chunked:
                raw += piece
                while True:  # de-chunk every complete chunk in raw
                    eol = raw.find(b"\r\n", pos)
                    if eol < 0:
                        break
                    size = int(raw[pos:eol].split(b";")[0], 16)
                    if size == 0:
                        finished = True
                        break
                    if len(raw) < eol + 2 + size + 2:
                        break
                    data += raw[eol + 2 : eol + 2 + size]
                    pos = eol + 2 + size + 2
                if pos > 1 << 16:
                    del raw[:pos]
                    pos = 0
            else:
                data += piece
                if length is not None and len(data) >= length:
                    finished = True
            now = time.perf_counter()
            if rec["ttft_ms"] is None:
                if _DELTA.search(data, max(0, scanned - 16)):
                    rec["ttft_ms"] = (now - t0) * 1000
                    last_read = now
            elif not finished:
                rec["gaps_ms"].append(round((now - last_read) * 1000, 3))
                last_read = now
            scanned = len(data)
        rec["latency_ms"] = (time.perf_counter() - t0) * 1000
        _parse_body(bytes(data), rec)
    except Exception as exc:  # every failure is a counted error; the run goes on
        rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    return rec


def _parse_body(data: bytes, rec: dict[str, Any]) -> None:
    import orjson

    if rec["status"] != 200:
        rec["error"] = data[:300].decode(errors="replace")
        return
    for ev in data.split(b"\n\n"):
        ev = ev.strip()
        if not ev.startswith(b"data:"):
            continue
        payload = ev[5:].strip()
        if payload == b"[DONE]":
            rec["done"] = True
            continue
        rec["events"] += 1
        if _DELTA.search(payload):
            rec["text_events"] += 1
        if b'"error"' in payload and payload.startswith(b'{"error"'):
            rec["error"] = payload[:300].decode(errors="replace")
            continue
        if _USAGE.search(payload) or b'"finish_reason":"' in payload:
            obj = orjson.loads(payload)
            usage = obj.get("usage")
            if usage:
                rec["prompt_tokens"] = usage.get("prompt_tokens") or 0
                rec["completion_tokens"] = usage.get("completion_tokens") or 0
                rec["cached_tokens"] = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            for ch in obj.get("choices") or []:
                if ch.get("finish_reason"):
                    rec["finish_reason"] = ch["finish_reason"]


async def _loadgen(spec: dict[str, Any]) -> dict[str, Any]:
    sessions: list[list[bytes]] = [[b.encode() for b in s] for s in spec["sessions"]]
    records: list[dict[str, Any]] = []
    todo = iter(range(len(sessions)))

    async def worker() -> None:
        for si in todo:
            for ti, body in enumerate(sessions[si]):
                rec = await _request(spec["host"], spec["port"], spec["path"], body, spec["timeout"])
                rec["session"], rec["turn"] = si, ti
                records.append(rec)

    async def session_at(si: int, start: float) -> None:
        await asyncio.sleep(max(0.0, t0 + start - time.perf_counter()))
        for ti, body in enumerate(sessions[si]):
            rec = await _request(spec["host"], spec["port"], spec["path"], body, spec["timeout"])
            rec["session"], rec["turn"] = si, ti
            records.append(rec)

    cpu0 = time.process_time()
    t0 = time.perf_counter()
    if spec.get("arrivals") is not None:
        await asyncio.gather(*(session_at(si, a) for si, a in enumerate(spec["arrivals"])))
    else:
        await asyncio.gather(*(worker() for _ in range(min(spec["concurrency"], len(sessions)))))
    return {"records": records, "wall_s": time.perf_counter() - t0, "client_cpu_s": time.process_time() - cpu0}


def _loadgen_main(spec_path: str, out_path: str) -> int:
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    spec = json.loads(Path(spec_path).read_text())
    out = asyncio.run(_loadgen(spec))
    Path(out_path).write_text(json.dumps(out))
    return 0


@contextlib.contextmanager
def cleanup(procs: list[Proc]) -> Iterator[list[Proc]]:
    """Stops every process appended to ``procs`` on exit, newest first."""
    try:
        yield procs
    finally:
        stop_all(procs)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "loadgen":
        sys.exit(_loadgen_main(sys.argv[2], sys.argv[3]))
    print("bench/_common.py: helpers of the serving benches; nothing to run on its own")
