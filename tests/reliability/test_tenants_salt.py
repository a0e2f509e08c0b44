"""Tenant isolation, the pure parts: the keys file, key -> tenant lookup, the salt derivation, the salted hash
chain (unsalted hashes unchanged), the salted piece cache, and a mocker whose blocks and KV events carry the
salted hashes. The stack-level paired test is tests/reliability/test_tenants.py."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from array import array
from pathlib import Path

import pytest

from dynamo_rt import kvhash
from dynamo_rt.errors import ConfigError, InvalidRequest
from dynamo_rt.protocol import GenerateRequest, KvEvent, StopConditions
from frontend import tenants
from frontend.preprocess import _PieceCache
from workers.common.engine import ModelInfo
from workers.mocker import MockerEngine

ROOT = Path(__file__).resolve().parents[2]
TOKENS = list(range(100, 164))  # four blocks of 16
# Pinned values of the chain as it was before salts existed: KV events of unsalted requests are unchanged.
UNSALTED = [9079492810832352209, 3315408388587145557, 4049066705118068577, 7342859302142369436]


# ------------------------------------------------------------------------------------------ hash chain


def test_unsalted_hashes_are_unchanged() -> None:
    assert kvhash.block_hashes(TOKENS, 16) == UNSALTED
    assert kvhash.block_hashes(TOKENS, 16, cache_salt="") == UNSALTED
    assert kvhash.chain_root("") == kvhash.ROOT_HASH == 0
    assert kvhash.hash_block(kvhash.ROOT_HASH, TOKENS[:16]) == UNSALTED[0]


def test_salted_chain_is_seeded_by_the_salt_and_shares_nothing() -> None:
    a = kvhash.block_hashes(TOKENS, 16, cache_salt="aa")
    b = kvhash.block_hashes(TOKENS, 16, cache_salt="bb")
    assert len(a) == len(b) == 4
    assert not set(a) & set(b) and not set(a) & set(UNSALTED)
    # Every site builds the same chain: block by block from chain_root, or all at once.
    root = kvhash.chain_root("aa")
    assert root not in (0, kvhash.chain_root("bb")) and 0 < root < 2**63
    assert kvhash.block_hashes(TOKENS, 16, root) == a
    assert kvhash.hash_block(root, TOKENS[:16]) == a[0]
    assert kvhash.hash_block(a[0], TOKENS[16:32]) == a[1]
    # Deterministic (the prefill and decode workers of one request compute it separately).
    assert kvhash.block_hashes(TOKENS, 16, cache_salt="aa") == a


# ------------------------------------------------------------------------------------------ salt


def test_salt_derivation() -> None:
    assert tenants.cache_salt(None) == "" and tenants.cache_salt(None, None) == ""
    acme = tenants.cache_salt("acme")
    assert len(acme) == 64 and int(acme, 16) >= 0 and acme == tenants.cache_salt("acme")
    assert acme != tenants.cache_salt("beta")
    # A client salt is mixed in, never replaces the tenant: no client salt gives another tenant's salt.
    mixed = tenants.cache_salt("acme", "s1")
    assert mixed not in (acme, tenants.cache_salt("beta", "s1"), tenants.cache_salt(None, "s1"))
    assert tenants.cache_salt("beta", "s1") != tenants.cache_salt("beta")
    # Without keys, only the client salt salts; it is still not the tenant-less empty salt.
    assert tenants.cache_salt(None, "s1") not in ("", tenants.cache_salt("s1"))
    # Field boundaries are unambiguous.
    assert tenants.cache_salt("ab", "c") != tenants.cache_salt("a", "bc")
    assert tenants.cache_salt("", "x") != tenants.cache_salt(None, "x")


def test_client_salt_is_checked() -> None:
    assert tenants.check_client_salt(None) is None and tenants.check_client_salt("x") == "x"
    for bad in ("", "x" * 257):
        with pytest.raises(InvalidRequest) as ei:
            tenants.check_client_salt(bad)
        assert ei.value.param == "cache_salt"


# ------------------------------------------------------------------------------------------ keys


def write(tmp: Path, doc: object) -> str:
    p = tmp / "keys.json"
    p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(p)


def test_keys_file_maps_keys_to_tenants(tmp_path: Path) -> None:
    ring = tenants.load_keys("sk-single", write(tmp_path, {"tenants": {"acme": ["sk-a1", "sk-a2"], "beta": ["sk-b"]}}))
    assert ring is not None and len(ring) == 4 and ring.tenants == {"acme", "beta", "default"}
    assert ring.authenticate([(b"authorization", b"Bearer sk-a1")]) == "acme"
    assert ring.authenticate([(b"authorization", b"bearer sk-a2")]) == "acme"
    assert ring.authenticate([(b"x-api-key", b"sk-b")]) == "beta"
    assert ring.authenticate([(b"authorization", b"Bearer sk-single")]) == "default"
    for headers in ([], [(b"authorization", b"Bearer sk-a")], [(b"authorization", b"sk-a1")],
                    [(b"authorization", b"Basic sk-a1")], [(b"authorization", b"Bearer")],
                    [(b"authorization", b"Bearer SK-A1")], [(b"x-api-key", b"")],
                    # An Authorization header that fails is not rescued by x-api-key.
                    [(b"authorization", b"Bearer nope"), (b"x-api-key", b"sk-b")]):
        assert ring.authenticate(headers) is None, headers
    assert tenants.load_keys(None, None) is None
    only = tenants.load_keys("sk-x", None)
    assert only is not None and only.lookup(b"sk-x") == "default"


@pytest.mark.parametrize("doc, why", [
    ("{not json", "is not JSON"),
    ([], "must be {"),
    ({"tenants": {}}, "must be {"),
    ({"tenants": {"acme": []}}, "non-empty list"),
    ({"tenants": {"acme": "sk-secret-1"}}, "non-empty list"),
    ({"tenants": {"acme": ["sk-secret-1", 5]}}, "key #2"),
    ({"tenants": {"acme": [" sk-secret-1"]}}, "key #1"),
    ({"tenants": {" ": ["sk-secret-1"]}}, "empty tenant"),
    ({"tenants": {"acme": ["sk-secret-1"], "beta": ["sk-secret-1"]}}, "also a key of tenant 'acme'"),
])
def test_malformed_keys_file_is_a_config_error(tmp_path: Path, doc: object, why: str) -> None:
    with pytest.raises(ConfigError) as ei:
        tenants.load_keys(None, write(tmp_path, doc))
    assert ei.value.flag == "--api-keys-file" and why in ei.value.message
    assert "sk-secret" not in ei.value.message  # a key never reaches an error line


def test_missing_keys_file_and_key_clash(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        tenants.load_keys(None, str(tmp_path / "absent.json"))
    assert ei.value.flag == "--api-keys-file" and "cannot be read" in ei.value.message
    with pytest.raises(ConfigError) as ei:
        tenants.load_keys("sk-a", write(tmp_path, {"tenants": {"acme": ["sk-a"]}}))
    assert ei.value.flag == "--api-key"


def test_frontend_exits_2_on_a_malformed_keys_file(tmp_path: Path) -> None:
    path = write(tmp_path, {"tenants": {"acme": "sk-secret-2"}})
    r = subprocess.run([sys.executable, "-m", "frontend", "--api-keys-file", path], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("dynamo-rt frontend: error: --api-keys-file: tenant 'acme'"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "sk-secret" not in r.stderr + r.stdout
    r = subprocess.run([sys.executable, "-m", "frontend"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(ROOT), "PATH": "", "DYN_API_KEYS_FILE": str(tmp_path / "nope")})
    assert r.returncode == 2 and "--api-keys-file: cannot be read" in r.stderr, r.stderr


# ------------------------------------------------------------------------------------------ caches


def test_piece_cache_is_keyed_by_salt() -> None:
    c = _PieceCache(max_chars=100)
    c.put("piece", array("i", [1, 2]), "acme")
    assert c.get("piece", "acme") == array("i", [1, 2])
    assert c.get("piece", "beta") is None and c.get("piece") is None
    c.put("piece", array("i", [1, 2]), "beta")
    assert len(c) == 2 and c.chars == 10


def test_mocker_blocks_and_events_carry_the_salted_hashes() -> None:
    info = ModelInfo(name="mock", path="", context_length=4096, block_size=16, eos_token_ids=[2], bos_token_id=1)
    prompt = [(i * 37) % 900 + 3 for i in range(80)]  # 5 full blocks, 4 cacheable

    async def main() -> None:
        e = MockerEngine(info, speedup=0, vocab_size=1000, num_blocks=256)
        events: list[KvEvent] = []
        e.set_kv_event_sink(events.extend)
        await e.start()
        cached = {}
        for rid, salt in (("a1", "aa"), ("a2", "aa"), ("b1", "bb"), ("u1", "")):
            r = GenerateRequest(request_id=rid, token_ids=prompt, cache_salt=salt,
                                stop=StopConditions(max_tokens=1, ignore_eos=True))
            outs = [o async for o in e.generate(r)]
            cached[rid] = outs[0].cached_tokens
        await e.stop()
        assert cached == {"a1": 0, "a2": 64, "b1": 0, "u1": 0}
        stored = {h for ev in events if ev.kind == "stored" for h in ev.block_hashes}
        # Each salt's chain of the prompt's 5 full blocks, nothing shared: 15 distinct hashes.
        assert stored == {h for salt in ("aa", "bb", "") for h in kvhash.block_hashes(prompt, 16, cache_salt=salt)}
        assert len(stored) == 15

    asyncio.run(asyncio.wait_for(main(), 30))


def test_reference_kv_tiers_keep_tenants_apart(tmp_path: Path) -> None:
    """The reference engine's host and disk tiers are keyed by the salted hashes: a tenant's prefix evicted
    from the primary pool onboards for that tenant and never for another."""
    from dynamo_rt.local.tinymodel import ensure_tiny_model
    from dynamo_rt.protocol import SamplingParams
    from workers.reference.engine import ReferenceEngine

    a_salt, b_salt = tenants.cache_salt("acme"), tenants.cache_salt("beta")
    prompt = [10 + (i * 53) % 2000 for i in range(100)]  # 6 full blocks
    filler = [10 + (i * 71 + 5) % 2000 for i in range(100)]

    async def gen(eng: ReferenceEngine, rid: str, tokens: list[int], salt: str) -> tuple[list[int], int]:
        r = GenerateRequest(request_id=rid, token_ids=tokens, sampling=SamplingParams(temperature=0.0),
                            stop=StopConditions(max_tokens=4, ignore_eos=True), cache_salt=salt)
        outs = [o async for o in eng.generate(r)]
        return [t for o in outs for t in o.token_ids], outs[0].cached_tokens

    async def idle(eng: ReferenceEngine) -> None:
        while not eng.tiers_idle():
            await asyncio.sleep(0.02)

    async def onboarded(eng: ReferenceEngine) -> int:
        st = eng.block_stats()
        return int(st["onboarded_host"]) + int(st["onboarded_disk"])

    async def main() -> None:
        eng = ReferenceEngine(ensure_tiny_model(), num_blocks=8, host_tier_path=str(tmp_path / "host.kv"),
                              host_tier_blocks=8, disk_tier_path=str(tmp_path / "disk"), disk_tier_blocks=64)
        await eng.start()
        try:
            want, cached = await gen(eng, "a1", prompt, a_salt)
            assert cached == 0
            await gen(eng, "f1", filler, "")  # evicts a's blocks from the 8-block primary pool
            await idle(eng)
            tiers = eng.cached_block_hashes_by_tier()
            salted_a = kvhash.block_hashes(prompt, 16, cache_salt=a_salt)
            assert set(salted_a) <= set(tiers["host"]) | set(tiers["disk"])
            assert not set(kvhash.block_hashes(prompt, 16)) & set(tiers["host"] + tiers["disk"])
            n0 = await onboarded(eng)
            assert await gen(eng, "b1", prompt, b_salt) == (want, 0)  # same output, nothing from a's copies
            assert await onboarded(eng) == n0
            await gen(eng, "f2", filler, "")
            await idle(eng)
            assert await gen(eng, "a2", prompt, a_salt) == (want, 96)  # a's 6 blocks, back from the tiers
            assert await onboarded(eng) > n0
        finally:
            await eng.stop()

    asyncio.run(asyncio.wait_for(main(), 120))
