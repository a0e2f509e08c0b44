"""The KV host tier in the RBG manifests: rendered only for engines whose block manager has one (the reference
engine), on prefill workers, as a memory-backed emptyDir and worker flags that point the tier at a file
smaller than the volume; pods update in place, so the volume and the tier survive an image change. The
shipped files (SGLang, vLLM, TensorRT-LLM) carry none: those engines would not use it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from deploy import render
from deploy.catalog import dump_documents
from deploy.render import KV_HOST_TIER_MOUNT, KV_HOST_TIER_VOLUME, build_documents, kv_host_tier_file_gib
from deploy.spec import preset
from dynamo_rt.errors import InvalidRequest
from tests.test_manifests import MANIFESTS, RBG_FILES, containers_by_role, rbg_of
from workers.main import parse_args
from workers.reference import kvbm

GIB = 2**30


def _pod(docs: list[dict[str, object]], role: str) -> dict[str, object]:
    (rbg,) = [d for d in docs if d["kind"] == "RoleBasedGroup"]
    (r,) = [r for r in rbg["spec"]["roles"] if r["name"] == role]  # type: ignore[index]
    patch = r["templatePatch"] if "templatePatch" in r else r["template"]
    return patch["spec"]  # type: ignore[no-any-return]


def test_no_shipped_manifest_carries_a_host_tier() -> None:
    for path in RBG_FILES:
        assert KV_HOST_TIER_VOLUME not in path.read_text(), path
        for role, c in containers_by_role(path).items():
            assert not any(a.startswith("--kv-host-tier") for a in c.get("args", [])), (path, role)


def test_an_engine_with_a_host_tier_gets_it_on_prefill_pods(monkeypatch: pytest.MonkeyPatch) -> None:
    """The seam: ``KV_HOST_TIER_ENGINES`` names the engines with a host tier; the manifest backends have none,
    so the test adds one to see what such an engine's prefill pods get, parsed by the reference worker CLI."""
    monkeypatch.setattr(render, "KV_HOST_TIER_ENGINES", ("sglang",))
    docs = build_documents(preset("sglang", "disagg"))
    text = dump_documents(docs, "")
    assert text.count(f"name: {KV_HOST_TIER_VOLUME}") == 2  # the prefill pod's volume and its mount, only
    pod = _pod(docs, "prefill")
    vols = {v["name"]: v for v in pod.get("volumes", [])}  # type: ignore[attr-defined]
    assert vols[KV_HOST_TIER_VOLUME]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    (c,) = pod["containers"]  # type: ignore[misc]
    assert {"name": KV_HOST_TIER_VOLUME, "mountPath": KV_HOST_TIER_MOUNT} in c["volumeMounts"]
    tier_args = c["args"][c["args"].index("--kv-host-tier-path"):][:4]
    assert tier_args == ["--kv-host-tier-path", f"{KV_HOST_TIER_MOUNT}/host.kv", "--kv-host-tier-gib", "62"]
    args = parse_args(["--engine", "reference", *tier_args], env={})  # what a reference worker parses
    size = int(args.kv_host_tier_gib * GIB)
    assert Path(args.kv_host_tier_path).parent == Path(KV_HOST_TIER_MOUNT) and size < 64 * GIB
    for block_bytes in (3_080_192, 65_536):  # the tier fits in that size for a large model's blocks and a small one's
        n = kvbm.slots_for_bytes(size, block_bytes)
        assert n > 0 and kvbm.file_size(n, block_bytes) <= size
    assert KV_HOST_TIER_VOLUME not in str(_pod(docs, "decoder"))


def test_size_arithmetic_and_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(render, "KV_HOST_TIER_ENGINES", ("sglang",))
    spec = preset("sglang", "disagg")
    for gib, file_gib in ((64, 62), (8, 7), (2, 1), (320, 310)):
        assert kv_host_tier_file_gib(gib) == file_gib
    for gib, present in ((64, True), (2, True), (1, False), (0, False)):  # 1 GiB leaves no room for a file
        text = dump_documents(build_documents(dataclasses.replace(spec, kv_host_tier_gib=gib)), "")
        assert (KV_HOST_TIER_VOLUME in text) == present, gib
    with pytest.raises(InvalidRequest, match="kv host tier"):
        build_documents(dataclasses.replace(spec, kv_host_tier_gib=-1))


def test_prefill_roles_update_in_place() -> None:
    """In place: an image change restarts the container in the same pod (an emptyDir would survive it)."""
    for path in (p for p in RBG_FILES if p.stem.startswith("disagg")):
        (role,) = [r for r in rbg_of(path)["spec"]["roles"] if r["name"] == "prefill"]
        assert role["rolloutStrategy"]["rollingUpdate"]["type"] == "InPlaceIfPossible", path


def test_readme_documents_the_tier_and_the_in_place_flow() -> None:
    readme = (MANIFESTS / "README.md").read_text()
    assert "### KV host tier across in-place updates" in readme
    for needle in ("--kv-host-tier-path, /kv-host-tier/host.kv, --kv-host-tier-gib, '62'", "--kv-host-hit-weight",
                   "InPlaceIfPossible", "medium: Memory", "sizeLimit: 64Gi", "none of the files here carries it"):
        assert needle in readme, needle
