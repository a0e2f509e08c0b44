"""The RBG manifests give prefill workers a memory-backed emptyDir for the KV host tier, and worker flags
that point the tier at it with a file smaller than the volume; the pods update in place (so the volume, and
the tier, survive an image change). Checked on the checked-in files with our own worker CLI."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from deploy.catalog import dump_documents
from deploy.render import KV_HOST_TIER_MOUNT, KV_HOST_TIER_VOLUME, build_documents, kv_host_tier_file_gib
from deploy.spec import preset
from dynamo_rt.errors import InvalidRequest
from tests.test_manifests import MANIFESTS, RBG_FILES, containers_by_role, effective_templates, rbg_of
from workers.main import parse_args
from workers.reference import kvbm

GIB = 2**30


def _volumes(path: Path, role: str) -> dict[str, dict[str, object]]:
    spec = effective_templates(rbg_of(path))[role]["spec"]
    return {v["name"]: v for v in spec.get("volumes", [])}


@pytest.mark.parametrize("path", [p for p in RBG_FILES if p.stem.startswith("disagg")],
                         ids=lambda p: str(p.relative_to(MANIFESTS)))
def test_prefill_workers_mount_the_host_tier_and_point_at_it(path: Path) -> None:
    c = containers_by_role(path)["prefill"]
    vol = _volumes(path, "prefill")[KV_HOST_TIER_VOLUME]
    assert vol["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    assert {"name": KV_HOST_TIER_VOLUME, "mountPath": "/kv-host-tier"} in c["volumeMounts"]
    args = parse_args(c["args"][1:], env={})  # what the worker process parses
    assert args.kv_host_tier_path == "/kv-host-tier/host.kv"
    assert Path(args.kv_host_tier_path).parent == Path(KV_HOST_TIER_MOUNT)
    size = int(args.kv_host_tier_gib * GIB)
    assert size < 64 * GIB  # the file (index included) stays inside the volume's sizeLimit
    # The tier the worker would create fits in that size, for a large model's blocks and a small one's.
    for block_bytes in (3_080_192, 65_536):
        n = kvbm.slots_for_bytes(size, block_bytes)
        assert n > 0 and kvbm.file_size(n, block_bytes) <= size
    # Updated in place: an image change restarts the container in the same pod, keeping the emptyDir.
    (role,) = [r for r in rbg_of(path)["spec"]["roles"] if r["name"] == "prefill"]
    assert role["rolloutStrategy"]["rollingUpdate"]["type"] == "InPlaceIfPossible"


def test_only_prefill_workers_get_it() -> None:
    for path in RBG_FILES:
        for role, c in containers_by_role(path).items():
            has = KV_HOST_TIER_VOLUME in _volumes(path, role)
            assert has == (role == "prefill"), (path, role)
            assert ("--kv-host-tier-path" in c.get("args", [])) == has


def test_size_flag_and_none() -> None:
    spec = preset("sglang", "disagg")
    for gib, file_gib in ((64, 62), (8, 7), (2, 1), (320, 310)):
        assert kv_host_tier_file_gib(gib) == file_gib
    for gib, present in ((64, True), (2, True), (1, False), (0, False)):  # 1 GiB leaves no room for a file
        text = dump_documents(build_documents(dataclasses.replace(spec, kv_host_tier_gib=gib)), "")
        assert (KV_HOST_TIER_VOLUME in text) == present, gib
    with pytest.raises(InvalidRequest, match="kv host tier"):
        build_documents(dataclasses.replace(spec, kv_host_tier_gib=-1))


def test_readme_documents_the_tier_and_the_in_place_flow() -> None:
    readme = (MANIFESTS / "README.md").read_text()
    assert "### KV host tier across in-place updates" in readme
    for needle in ("--kv-host-tier-path /kv-host-tier/host.kv --kv-host-tier-gib 62", "--kv-host-hit-weight",
                   "InPlaceIfPossible", "medium: Memory", "sizeLimit: 64Gi", "blocks recovered"):
        assert needle in readme, needle
