"""dynamo-rt's command line: a subcommand whose module cannot be imported is still listed and says what is
missing; a bad flag value (ConfigError) ends the process with one line and status 2, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dynamo_rt import cli
from dynamo_rt.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
MISSING = "dynamo_rt_test_missing_dependency"


def _standin(tmp_path: Path, name: str, body: str) -> Path:
    (tmp_path / f"{name}.py").write_text(body)
    return tmp_path


def test_a_role_that_cannot_be_imported_is_listed_and_reports_its_import_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.syspath_prepend(str(_standin(tmp_path, "standin_broken_role", f"import {MISSING}\n")))
    monkeypatch.setitem(cli.SUBCOMMANDS, "standin", ("standin_broken_role", "a stand-in role"))
    assert "standin" in cli.build_parser().format_help()
    assert cli.main(["standin", "--anything", "x"]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == (f"dynamo-rt standin: error: cannot import standin_broken_role: "
                       f"No module named '{MISSING}'\n")
    # The other roles are unaffected.
    with pytest.raises(SystemExit) as exc:
        cli.main(["frontend", "--help"])
    assert exc.value.code == 0


def test_a_config_error_is_one_line_and_status_2(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    body = ("from dynamo_rt.errors import ConfigError\n"
            "def add_arguments(p):\n    p.add_argument('--widgets', type=int, default=1)\n"
            "def run(args):\n    raise ConfigError('--widgets', f'must be > 0, got {args.widgets}')\n")
    monkeypatch.syspath_prepend(str(_standin(tmp_path, "standin_config_role", body)))
    monkeypatch.setitem(cli.SUBCOMMANDS, "standin", ("standin_config_role", "a stand-in role"))
    assert cli.main(["standin", "--widgets", "-1"]) == 2
    assert capsys.readouterr().err == "dynamo-rt standin: error: --widgets: must be > 0, got -1\n"
    assert ConfigError("--x", "why").message == "--x: why"


def _run(args: list[str], *, pythonpath: str = str(REPO), env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    environ = {"PATH": "/usr/bin:/bin", "PYTHONPATH": pythonpath, **(env or {})}
    return subprocess.run([sys.executable, *args], env=environ, cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_import_error_of_a_role_in_a_real_process(tmp_path: Path) -> None:
    _standin(tmp_path, "standin_broken_role", f"import {MISSING}\n")
    launch = ("import sys; from dynamo_rt import cli; "
              "cli.SUBCOMMANDS['standin'] = ('standin_broken_role', 'a stand-in role'); sys.exit(cli.main())")
    pythonpath = f"{tmp_path}:{REPO}"
    listed = _run(["-c", launch, "--help"], pythonpath=pythonpath)
    assert listed.returncode == 0 and "standin" in listed.stdout
    assert f"unavailable: No module named '{MISSING}'" in " ".join(listed.stdout.split())
    ran = _run(["-c", launch, "standin", "--help"], pythonpath=pythonpath)
    assert (ran.returncode, ran.stdout) == (2, "")
    assert ran.stderr == f"dynamo-rt standin: error: cannot import standin_broken_role: No module named '{MISSING}'\n"
    unknown = _run(["-m", "dynamo_rt", "no-such-role"])  # not a role at all: argparse's own answer
    assert unknown.returncode == 2 and "invalid choice: 'no-such-role'" in unknown.stderr


@pytest.mark.parametrize(("args", "env", "line"), [
    (["-m", "dynamo_rt", "frontend", "--kv-host-hit-weight", "2"], {},
     "dynamo-rt frontend: error: --kv-host-hit-weight: must be in [0, 1] (the fraction of a device-memory hit), "
     "got 2"),
    (["-m", "dynamo_rt", "frontend"], {"DYN_MAX_QUEUE": "-3"},
     "dynamo-rt frontend: error: --max-queue: must be >= 0, got -3"),
    (["-m", "frontend", "--migration-limit", "-1"], {},
     "dynamo-rt frontend: error: --migration-limit: must be >= 0, got -1"),
    (["-m", "frontend", "--api-key", " "], {},
     "dynamo-rt frontend: error: --api-key: is empty (leave it unset to serve without a key)"),
])  # fmt: skip
def test_a_bad_frontend_flag_ends_the_process_with_one_line(args: list[str], env: dict[str, str], line: str) -> None:
    p = _run(args, env=env)
    assert (p.returncode, p.stdout, p.stderr) == (2, "", line + "\n")


def test_a_config_error_while_reading_env_twins_is_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    body = ("from dynamo_rt.errors import ConfigError\n"
            "def add_arguments(p):\n    raise ConfigError('--widgets', 'DYN_WIDGETS is not a number')\n")
    monkeypatch.syspath_prepend(str(_standin(tmp_path, "standin_env_role", body)))
    monkeypatch.setitem(cli.SUBCOMMANDS, "standin", ("standin_env_role", "a stand-in role"))
    assert cli.main(["standin"]) == 2
    assert capsys.readouterr().err == "dynamo-rt standin: error: --widgets: DYN_WIDGETS is not a number\n"


@pytest.mark.parametrize(("args", "env", "line"), [
    (["-m", "workers", "--engine", "mocker"], {"DYN_MOCKER_MAX_NUM_SEQS": "x"},
     "dynamo-rt worker: error: --max-num-seqs: DYN_MOCKER_MAX_NUM_SEQS='x' is not a valid value "
     "(invalid literal for int() with base 10: 'x')"),
    (["-m", "frontend"], {"DYN_HTTP_PORT": "80a"},
     "dynamo-rt frontend: error: --http-port: DYN_HTTP_PORT='80a' is not a valid value "
     "(invalid literal for int() with base 10: '80a')"),
    (["-m", "dynamo_rt", "up"], {"DYN_UP_DISAGG": "maybe"},
     "dynamo-rt up: error: --disagg: DYN_UP_DISAGG='maybe' is not a valid value (not a boolean: 'maybe')"),
])  # fmt: skip
def test_a_badly_typed_env_twin_names_its_flag_and_variable(args: list[str], env: dict[str, str], line: str) -> None:
    p = _run(args, env=env)
    assert (p.returncode, p.stdout, p.stderr) == (2, "", line + "\n")
