"""The frontend's flag values: each bad one is a ConfigError naming its flag (the process prints one line)."""

from __future__ import annotations

import pytest

from dynamo_rt.errors import ConfigError
from frontend.main import check_args, parse_args


def test_defaults_and_edges_are_accepted() -> None:
    check_args(parse_args([], env={}))
    check_args(parse_args(["--http-port", "0", "--kv-host-hit-weight", "1", "--kv-disk-hit-weight", "0",
                           "--migration-limit", "0", "--api-key", "sk-1"], env={}))


@pytest.mark.parametrize(("argv", "flag", "why"), [
    (["--http-port", "-1"], "--http-port", "must be a TCP port (0..65535; 0 picks a free one), got -1"),
    (["--http-port", "65536"], "--http-port", "must be a TCP port (0..65535; 0 picks a free one), got 65536"),
    (["--kv-host-hit-weight", "1.5"], "--kv-host-hit-weight",
     "must be in [0, 1] (the fraction of a device-memory hit), got 1.5"),
    (["--kv-disk-hit-weight", "-0.1"], "--kv-disk-hit-weight",
     "must be in [0, 1] (the fraction of a device-memory hit), got -0.1"),
    (["--kv-overlap-weight", "-1"], "--kv-overlap-weight", "must be >= 0, got -1"),
    (["--router-temperature", "-0.5"], "--router-temperature", "must be >= 0, got -0.5"),
    (["--disagg-threshold", "-1"], "--disagg-threshold", "must be >= 0, got -1"),
    (["--max-concurrency", "-1"], "--max-concurrency", "must be >= 0, got -1"),
    (["--prepare-threads", "-1"], "--prepare-threads", "must be >= 0, got -1"),
    (["--prepare-nice", "20"], "--prepare-nice", "must be in 0..19 (added to the threads' nice value), got 20"),
    (["--prepare-nice", "-1"], "--prepare-nice", "must be in 0..19 (added to the threads' nice value), got -1"),
    (["--worker-wait-timeout", "-2"], "--worker-wait-timeout", "must be >= 0, got -2"),
    (["--max-body-bytes", "0"], "--max-body-bytes", "must be > 0, got 0"),
    (["--request-timeout", "-1"], "--request-timeout", "must be > 0, got -1"),
    (["--api-key", ""], "--api-key", "is empty (leave it unset to serve without a key)"),
])  # fmt: skip
def test_each_bad_value_names_its_flag(argv: list[str], flag: str, why: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_args(parse_args(argv, env={}))
    assert (err.value.flag, err.value.message) == (flag, f"{flag}: {why}")


def test_a_bad_env_twin_is_reported_under_its_flag() -> None:
    with pytest.raises(ConfigError) as err:
        check_args(parse_args([], env={"DYN_MIGRATION_LIMIT": "-4"}))
    assert err.value.message == "--migration-limit: must be >= 0, got -4"
