"""dynamo_rt.local.commands: the exact command lines each role is started with, by ``dynamo-rt up``, the
planner's local connector, the profiler, tests/stack.py and the benches."""

from __future__ import annotations

import sys

from dynamo_rt.local import commands
from dynamo_rt.local.launcher import build_parser, frontend_command, planner_command, worker_commands
from planner.connectors import LocalWorkerSpec

PY = sys.executable


def test_worker_argv() -> None:
    assert commands.worker("mocker", "agg", "tiny") == [PY, "-m", "workers", "--engine", "mocker", "--mode", "agg",
                                                         "--model", "tiny"]
    assert commands.worker("vllm", "decode", "/m", served_model_name="m", graceful_timeout=2.5,
                           extra=["--speedup", "3"], python="py") == [
        "py", "-m", "workers", "--engine", "vllm", "--mode", "decode", "--model", "/m", "--graceful-timeout", "2.5",
        "--served-model-name", "m", "--speedup", "3"]


def test_frontend_argv() -> None:
    assert commands.frontend(8000) == [PY, "-m", "frontend", "--http-host", "127.0.0.1", "--http-port", "8000"]
    assert commands.frontend(81, host="0.0.0.0", router_mode="kv", worker_wait_timeout=120.0, extra=["--x"]) == [
        PY, "-m", "frontend", "--http-host", "0.0.0.0", "--http-port", "81", "--router-mode", "kv",
        "--worker-wait-timeout", "120", "--x"]


def test_up_agg_and_disagg_workers() -> None:
    args = build_parser(env={}).parse_args(["--engine", "mocker", "--workers", "2", "--", "--speedup", "10"])
    base = [PY, "-m", "workers", "--engine", "mocker"]
    assert worker_commands(args) == [
        (f"worker-{i}", [*base, "--mode", "agg", "--model", "tiny", "--graceful-timeout", "5", "--speedup", "10"])
        for i in range(2)]
    args = build_parser(env={}).parse_args(["--engine", "reference", "--disagg", "--decode-workers", "2",
                                            "--served-model-name", "m"])
    assert [(name, argv[6]) for name, argv in worker_commands(args)] == [
        ("prefill-0", "prefill"), ("decode-0", "decode"), ("decode-1", "decode")]
    assert worker_commands(args)[0][1][-2:] == ["--served-model-name", "m"]


def test_up_frontend_waits_for_workers_only_with_the_planner() -> None:
    args = build_parser(env={}).parse_args(["--http-port", "9000", "--router-mode", "kv"])
    assert frontend_command(args) == [PY, "-m", "frontend", "--http-host", "127.0.0.1", "--http-port", "9000",
                                      "--router-mode", "kv", "--drain-timeout", "10"]
    args = build_parser(env={}).parse_args(["--planner", "--drain-timeout", "2.5"])
    assert frontend_command(args)[-4:] == ["--worker-wait-timeout", "120", "--drain-timeout", "2.5"]


def test_up_planner_argv() -> None:
    args = build_parser(env={}).parse_args(["--engine", "mocker", "--disagg", "--planner", "--prefill-workers", "9",
                                            "--served-model-name", "m", "--planner-args", "--adjustment-interval 2",
                                            "--", "--speedup", "10"])
    assert planner_command(args, "http://127.0.0.1:8000") == [
        PY, "-m", "dynamo_rt", "planner", "--connector", "local", "--frontend-url", "http://127.0.0.1:8000",
        "--mode", "disagg", "--worker-engine", "mocker", "--worker-model", "tiny", "--worker-graceful-timeout", "5",
        "--worker-args", "--speedup 10", "--model", "m", "--min-prefill", "9", "--max-prefill", "9",
        "--min-decode", "1", "--engine-speedup", "10", "--adjustment-interval", "2"]


def test_local_connector_worker_argv() -> None:
    spec = LocalWorkerSpec(engine="mocker", model="tiny", served_model_name="m", extra_args=["--speedup", "2"],
                           graceful_timeout=10, python="py")
    assert spec.command("prefill") == ["py", "-m", "workers", "--engine", "mocker", "--mode", "prefill", "--model",
                                       "tiny", "--graceful-timeout", "10", "--served-model-name", "m", "--speedup", "2"]
