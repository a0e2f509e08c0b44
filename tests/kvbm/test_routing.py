"""KV router cost with tiers: a block a worker holds in its host or disk tier counts as a fraction of a
primary hit (``host_hit_weight`` / ``disk_hit_weight``), so the router prefers primary > host > disk >
recomputing, and load still weighs in. Pure logic on a real :class:`KvIndexer` fed KV events."""

from __future__ import annotations

import pytest

from dynamo_rt.errors import InvalidRequest
from dynamo_rt.kvhash import block_hashes
from dynamo_rt.protocol import KvEvent, KvEvents, LoadMetrics
from dynamo_rt.router import ApproxIndexer, KvIndexer, Router
from frontend.main import parse_args

PROMPT = list(range(10, 110))  # 100 tokens: 7 blocks, 6 full
HASHES = block_hashes(PROMPT, 16)
# The router's load term includes the blocks the request itself would add to the worker's in-flight set:
# all 7 on a worker with nothing in flight (the same for every worker here, so it never changes a decision).
NEW = 7


def _index(held: dict[str, list[tuple[str, list[int]]]]) -> KvIndexer:
    ix = KvIndexer()
    for w, parts in held.items():
        ix.apply(KvEvents(instance_id=w, seq=0, events=[KvEvent("stored", hs, None, t) for t, hs in parts]))
    return ix


def test_tier_weighted_costs_are_exact() -> None:
    ix = _index({
        "primary": [("primary", HASHES)],
        "host": [("host", HASHES)],
        "disk": [("disk", HASHES)],
        "mixed": [("primary", HASHES[:2]), ("host", HASHES[2:5]), ("disk", HASHES[5:])],
        "gap": [("host", HASHES[:2]), ("disk", HASHES[3:])],  # block 2 nowhere: the prefix stops there
    })
    r = Router("kv", indexer=ix, host_hit_weight=0.5, disk_hit_weight=0.25)
    workers = ["primary", "host", "disk", "mixed", "gap", "none"]
    assert r.costs(workers, PROMPT, {}) == {
        "primary": (7 - 6 + NEW, 6),
        "host": (7 - 0.5 * 6 + NEW, 6),
        "disk": (7 - 0.25 * 6 + NEW, 6),
        "mixed": (7 - (2 + 0.5 * 3 + 0.25 * 1) + NEW, 6),
        "gap": (7 - 0.5 * 2 + NEW, 2),
        "none": (7 + NEW, 0),
    }
    assert r.select(workers, PROMPT, {}).worker_id == "primary"
    assert r.select(["host", "disk", "none"], PROMPT, {}).worker_id == "host"
    assert r.select(["disk", "none"], PROMPT, {}).worker_id == "disk"
    # overlap_weight scales the whole prompt term.
    r2 = Router("kv", indexer=ix, overlap_weight=2.0)
    assert r2.costs(["host"], PROMPT, {}) == {"host": (2.0 * (7 - 3) + NEW, 6)}


def test_load_still_counts_and_zero_weights_ignore_lower_tiers() -> None:
    ix = _index({"host": [("host", HASHES)]})
    busy = {"host": LoadMetrics(instance_id="host", active_decode_blocks=5)}
    r = Router("kv", indexer=ix)  # defaults 0.5 / 0.25
    assert r.costs(["host", "idle"], PROMPT, busy) == {"host": (4 + 5 + NEW, 6), "idle": (7 + NEW, 0)}
    assert r.select(["host", "idle"], PROMPT, busy).worker_id == "idle"
    off = Router("kv", indexer=ix, host_hit_weight=0.0, disk_hit_weight=0.0)
    assert off.costs(["host"], PROMPT, {}) == {"host": (7 + NEW, 0)}
    # A pinned request reports the overlap in any tier.
    d = r.select(["host", "idle"], PROMPT, {}, pinned="host")
    assert (d.worker_id, d.overlap_blocks, d.reason) == ("host", 6, "pinned")


def test_without_lower_tiers_costs_are_unchanged() -> None:
    ix = _index({"a": [("primary", HASHES[:4])]})
    assert not ix.has_lower_tiers()
    r = Router("kv", indexer=ix)
    assert r.costs(["a", "b"], PROMPT, {}) == {"a": (3 + NEW, 4), "b": (7 + NEW, 0)}
    ax = Router("kv", indexer=ApproxIndexer())  # no tiers there at all
    ax.select(["a"], PROMPT, {}, track=False)
    assert ax.costs(["a", "b"], PROMPT, {}) == {"a": (1 + NEW, 6), "b": (7 + NEW, 0)}
    # Once the last lower-tier block is removed, the index walks primary only again.
    ix.apply(KvEvents(instance_id="a", seq=1, events=[KvEvent("stored", HASHES[4:], None, "host")]))
    assert ix.has_lower_tiers()
    assert r.costs(["a"], PROMPT, {}) == {"a": (7 - (4 + 0.5 * 2) + NEW, 6)}
    ix.apply(KvEvents(instance_id="a", seq=2, events=[KvEvent("removed", HASHES[4:], None, "host")]))
    assert not ix.has_lower_tiers()
    assert r.costs(["a"], PROMPT, {}) == {"a": (3 + NEW, 4)}


@pytest.mark.parametrize("kw", [{"host_hit_weight": 1.5}, {"disk_hit_weight": -0.1}])
def test_weights_outside_zero_one_are_refused(kw: dict[str, float]) -> None:
    with pytest.raises(InvalidRequest, match="must be in \\[0, 1\\]"):
        Router("kv", **kw)  # type: ignore[arg-type]


def test_frontend_flags_and_env_twins() -> None:
    args = parse_args(["--router-mode", "kv", "--kv-host-hit-weight", "0.7"], env={"DYN_KV_DISK_HIT_WEIGHT": "0.1"})
    assert (args.kv_host_hit_weight, args.kv_disk_hit_weight) == (0.7, 0.1)
    assert (parse_args([], env={}).kv_host_hit_weight, parse_args([], env={}).kv_disk_hit_weight) == (0.5, 0.25)
