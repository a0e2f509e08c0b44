"""dynamo_rt.local.harness with real child processes: a stop takes the whole process group (grandchildren
that ignore SIGTERM included), a child dies with its parent even when the thread that started it has ended,
a stack fails fast naming the child that exited (code and log tail), and the log file holds the output."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from dynamo_rt.local.harness import DRAIN, Child, ChildExited, NotReady, Stack, wait_http
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie may wait a while for its reaper)."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _wait(cond: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def _first_line(path: Path, timeout: float = 5.0) -> str:
    """The first line a child wrote after the harness's header, once it is there."""
    assert _wait(lambda: len(path.read_text().splitlines()) >= 3, timeout), path.read_text()
    return path.read_text().splitlines()[2]


def test_stop_takes_grandchildren_that_ignore_sigterm(tmp_path: Path) -> None:
    log = tmp_path / "c.log"
    # sh and its sleep both ignore SIGTERM (an ignored signal stays ignored across fork and exec).
    child = Child("stubborn", ["sh", "-c", 'trap "" TERM; sleep 30 & echo $!; wait'], log=log)
    grandchild = int(_first_line(log))
    assert _running(child.pid) and _running(grandchild)
    t0 = time.monotonic()
    assert child.stop(timeout=0.5) == -signal.SIGKILL  # the bounded wait, then SIGKILL to the group
    assert time.monotonic() - t0 < 5
    assert _wait(lambda: not _running(grandchild))


def test_stop_after_a_clean_exit_still_clears_the_group(tmp_path: Path) -> None:
    log = tmp_path / "c.log"
    # The leader exits on SIGTERM at once; the grandchild it leaves behind ignores SIGTERM.
    child = Child("leader", ["sh", "-c", '(trap "" TERM; exec sleep 30) & echo $!; wait'], log=log)
    grandchild = int(_first_line(log))
    t0 = time.monotonic()
    assert child.stop(timeout=5) == -signal.SIGTERM
    assert time.monotonic() - t0 < 4  # no wait for the grandchild: the group got SIGKILL right away
    assert _wait(lambda: not _running(grandchild))


_PARENT = textwrap.dedent(
    """
    import signal, sys, threading, time
    from pathlib import Path
    from dynamo_rt.local.harness import Child
    log, sig = Path(sys.argv[1]), int(sys.argv[2])
    # The child traps SIGTERM (it reports it and exits 0); SIGKILL cannot be trapped.
    argv = ["sh", "-c", 'trap "echo got TERM; exit 0" TERM; echo started; while :; do sleep 0.05; done']
    out = []
    t = threading.Thread(target=lambda: out.append(Child("orphan", argv, log=log, death_signal=sig)))
    t.start()
    t.join()  # the thread that asked for the child is gone before the child has done anything
    print(out[0].pid, flush=True)
    time.sleep(60)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGKILL, DRAIN], ids=["default-sigkill", "drain-sigterm"])
def test_child_dies_with_its_parent_after_the_spawning_thread_ended(tmp_path: Path, sig: int) -> None:
    log = tmp_path / "orphan.log"
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(log), str(int(sig))], stdout=subprocess.PIPE,
                              cwd=REPO, text=True)
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        assert _first_line(log) == "started"
        time.sleep(0.3)
        assert _running(pid)  # the short-lived thread's end did not take the child with it
        parent.kill()
        parent.wait()
        assert _wait(lambda: not _running(pid)), "the child outlived its parent"
        said = log.read_text().splitlines()[3:]
        assert said == (["got TERM"] if sig == DRAIN else [])  # the death signal is the one asked for
    finally:
        parent.kill()
        parent.wait()


def test_stack_fails_fast_naming_the_child_that_exited(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/health"  # nothing listens there
    t0 = time.monotonic()
    with Stack(stop_timeout=2) as stack:
        steady = stack.start("steady", ["sleep", "30"], log=tmp_path / "steady.log")
        stack.start("broken", ["sh", "-c", "echo loading; echo 'error: bad flag --x' >&2; exit 3"],
                    log=tmp_path / "broken.log")
        with pytest.raises(ChildExited) as err:
            stack.wait_http(url, lambda status, body: status == 200, timeout=60)
    assert time.monotonic() - t0 < 10  # not the 60 s timeout
    assert (err.value.name, err.value.exit_code) == ("broken", 3)
    assert err.value.tail.splitlines()[-2:] == ["loading", "error: bad flag --x"]
    assert str(err.value).startswith("broken exited with code 3 before it was ready:\n")
    assert steady.returncode == -signal.SIGTERM  # the stack stopped the others on the way out


def test_wait_http_returns_what_ready_returns_and_times_out(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    with Stack(stop_timeout=2) as stack:
        stack.start("http", [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                    cwd=tmp_path, log=tmp_path / "http.log")
        # http.server lists the folder as HTML: no JSON body, but a status.
        assert stack.wait_http(url, lambda status, body: status == 200 and body is None and "up", 30) == "up"
        with pytest.raises(NotReady, match=r"(?s)not ready at .* after 0s.*--- http\n"):
            wait_http(url, stack.children, lambda status, body: status == 404, 0.3)


def test_log_file_holds_the_output_run_after_run(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "c.log"  # the folder is made on demand
    for word in ("one", "two"):
        child = Child("echo", ["sh", "-c", f"echo {word}; echo {word}-err >&2"], log=log)
        assert child.wait(10) == 0
    lines = log.read_text().splitlines()
    headers = [i for i, line in enumerate(lines) if line.startswith("=== ")]
    assert len(headers) == 2 and lines[headers[0]].endswith(" sh -c echo one; echo one-err >&2")
    assert [line for line in lines if line and not line.startswith("=== ")] == ["one", "one-err", "two", "two-err"]


def test_spawns_from_many_threads_all_run(tmp_path: Path) -> None:
    """Children asked for from several threads at once (each handed to the one spawner thread) all start."""
    children: list[Child] = []
    lock = threading.Lock()

    def spawn(i: int) -> None:
        c = Child(f"t{i}", ["sh", "-c", f"exit {i}"], log=tmp_path / f"t{i}.log")
        with lock:
            children.append(c)

    threads = [threading.Thread(target=spawn, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(c.wait(10) for c in children) == list(range(8))


def test_backoff_doubles_to_the_cap_resets_when_stable_and_gives_up_on_a_loop() -> None:
    from dynamo_rt.local.supervise import Backoff

    b = Backoff(first=0.5, cap=4.0, stable=60.0, limit=5, window=100.0)
    b.started(0.0)
    assert [b.crashed(t) for t in (1.0, 2.0, 3.0, 4.0, 5.0)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert b.crashed(6.0) is None  # the 6th crash within 100 s
    b = Backoff(first=0.5, cap=30.0, stable=60.0, limit=10, window=300.0)
    b.started(0.0)
    assert b.crashed(1.0) == 0.5 and b.crashed(2.0) == 1.0
    b.started(3.0)
    assert b.crashed(70.0) == 0.5  # it ran for a stable minute: the delay starts over


def test_supervisor_restarts_what_exited_after_its_delay(caplog: pytest.LogCaptureFixture) -> None:
    from dynamo_rt.local.supervise import Backoff, GaveUp, Supervised, Supervisor

    running = [True]
    starts: list[float] = []
    now = [0.0]

    def restart() -> int:
        starts.append(now[0])
        running[0] = True
        return 4242

    sup = Supervisor()
    sup.add(Supervised("worker-0", lambda: running[0], lambda: None if running[0] else -9, restart,
                       Backoff(limit=2, window=100.0)), 0.0)
    caplog.set_level("INFO", logger="dynamo_rt.up")
    running[0] = False
    for t in (1.0, 1.2, 1.5):
        now[0] = t
        sup.poll(t)
    assert starts == [1.5]
    assert "worker-0 exited with code -9; restarting in 0.5s (restart 1)" in caplog.text
    assert "restarted worker-0 (pid 4242, restart 1)" in caplog.text
    running[0] = False
    now[0] = 2.0
    sup.poll(2.0)
    assert "restarting in 1.0s (restart 2)" in caplog.text
    now[0] = 3.0
    sup.poll(3.0)
    running[0] = False
    with pytest.raises(GaveUp, match="worker-0 exited with code -9: 2 restarts within 100s already; giving up"):
        sup.poll(4.0)
