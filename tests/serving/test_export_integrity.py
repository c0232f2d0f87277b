"""Export integrity (issue 24 item 3): jax's own artifact format, a sha256 per file, eager and lazy checks.

One tiny GESR is exported once per module (request buckets 1 and 4, one chunk bucket: 4 artifacts); every
test damages its own copy of that export.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys
import warnings

import jax
import numpy as np
import pytest

from gesr_jax.serving import artifact
from gesr_jax.serving.buckets import Buckets
from gesr_jax.serving.export import export_scorer
from gesr_jax.serving.loader import load
from gesr_jax.serving.scorer import Scorer
from gesr_jax.serving.artifact import ArtifactUnavailable, ExportError
from gesr_jax.serving.requests import RequestError, requests_from_batch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from serving_helpers import SCHEMA, consistent_batch, gesr, item_table  # noqa: E402

BUCKETS = Buckets((1, 4), (16,))
DAMAGED = "score_r4_c16.jaxexp"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    graphdef, params = gesr()
    table = item_table()
    scorer = Scorer(graphdef, params, SCHEMA, table, buckets=BUCKETS)
    out = tmp_path_factory.mktemp("export") / "clean"
    manifest = export_scorer(scorer, out, platforms=("cpu",))
    requests = requests_from_batch(consistent_batch(SCHEMA, table, 5, seed=3), SCHEMA)
    # Five requests: sorted by candidate count, the four largest run as one R=4 batch, the last alone (R=1).
    return out, manifest, requests, scorer.score(requests)


def _copy(exported, tmp_path: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(exported[0], tmp_path / "export"))


def _flip_bit(path: pathlib.Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def _r1_request(requests: list, results: list) -> int:
    """The index of the request that ran alone (fewest candidates: the R=1 batch)."""
    counts = [len(r["cand_item"]) for r in requests]
    return int(np.argmin(counts))


def test_manifest_sums_every_file_in_jax_format(exported):
    out, manifest, requests, live = exported
    assert manifest["version"] == 2
    on_disk = sorted(p.name for p in out.iterdir() if p.name != "manifest.json")
    assert sorted(manifest["sha256"]) == on_disk
    for name, digest in manifest["sha256"].items():
        assert artifact.sha256((out / name).read_bytes()) == digest
    data = (out / DAMAGED).read_bytes()
    assert not data.startswith(artifact.LEGACY_MAGIC)
    assert isinstance(jax.export.deserialize(bytearray(data)), jax.export.Exported)  # jax's own format
    for mode in ("eager", "lazy"):
        for got, want in zip(load(out, verify=mode).score(requests), live, strict=True):
            for task in SCHEMA.tasks:
                np.testing.assert_allclose(got[task], want[task], atol=1e-6)


def test_eager_load_refuses_a_flipped_bit_naming_the_file(exported, tmp_path):
    out = _copy(exported, tmp_path)
    _flip_bit(out / DAMAGED)
    with pytest.raises(ExportError, match=DAMAGED) as info:
        load(out)
    assert info.value.path == out / DAMAGED and "damaged" in str(info.value)


def test_eager_load_names_every_damaged_file(exported, tmp_path):
    out = _copy(exported, tmp_path)
    _flip_bit(out / DAMAGED)
    _flip_bit(out / "encode_r1.jaxexp", offset=0)
    with pytest.raises(ExportError) as info:
        load(out, verify="eager")
    assert DAMAGED in str(info.value) and "encode_r1.jaxexp" in str(info.value) and "2 damaged" in str(info.value)


def test_lazy_load_fails_only_the_requests_of_the_damaged_bucket(exported, tmp_path):
    out = _copy(exported, tmp_path)
    _, _, requests, live = exported
    _flip_bit(out / DAMAGED)
    scorer = load(out, verify="lazy")  # the bucket files are not read yet
    alone = _r1_request(requests, live)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scorer.warmup()  # skips the damaged bucket, compiles the rest
    assert any(DAMAGED in str(w.message) for w in caught)
    for _ in range(2):  # the failure is remembered, and does not spread on the next call
        results = scorer.score(requests)
        for i, (got, want) in enumerate(zip(results, live, strict=True)):
            if i == alone:
                for task in SCHEMA.tasks:
                    np.testing.assert_allclose(got[task], want[task], atol=1e-6)
            else:
                assert isinstance(got, ArtifactUnavailable) and isinstance(got, RequestError)
                assert got.path == out / DAMAGED and DAMAGED in str(got) and got.index == i
    assert [e.path.name for e in scorer.damaged_files()] == [DAMAGED]
    # One request alone runs in the undamaged R=1 buckets.
    single = scorer.score([requests[0]])[0]
    for task in SCHEMA.tasks:
        np.testing.assert_allclose(single[task], live[0][task], atol=1e-6)


def test_lazy_load_still_checks_the_params_at_load(exported, tmp_path):
    out = _copy(exported, tmp_path)
    _flip_bit(out / "params.npz")
    for mode in ("eager", "lazy"):
        with pytest.raises(ExportError, match="params.npz"):
            load(out, verify=mode)


def test_a_missing_bucket_file_is_named(exported, tmp_path):
    out = _copy(exported, tmp_path)
    (out / "encode_r4.jaxexp").unlink()
    with pytest.raises(ExportError, match=r"encode_r4\.jaxexp: is missing"):
        load(out)
    results = load(out, verify="lazy").score(exported[2])
    assert sum(isinstance(r, ArtifactUnavailable) for r in results) == 4
    assert all("encode_r4.jaxexp" in str(r) for r in results if isinstance(r, RequestError))


def test_an_unreadable_artifact_with_a_matching_checksum_is_named(exported, tmp_path):
    out = _copy(exported, tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    garbage = b"\x00" * 64
    (out / DAMAGED).write_bytes(garbage)
    manifest["sha256"][DAMAGED] = artifact.sha256(garbage)
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match=f"{DAMAGED}: is not a readable jax.export artifact"):
        load(out)


@pytest.mark.parametrize("damage", ["truncated", "missing", "empty", "no_sha256", "unsummed_file", "version"])
def test_a_bad_manifest_is_refused_naming_it(exported, tmp_path, damage):
    out = _copy(exported, tmp_path)
    path = out / "manifest.json"
    text = path.read_text()
    manifest = json.loads(text)
    if damage == "truncated":
        path.write_text(text[: len(text) // 2])
    elif damage == "missing":
        path.unlink()
    elif damage == "empty":
        path.write_text("")
    elif damage == "no_sha256":
        path.write_text(json.dumps({k: v for k, v in manifest.items() if k != "sha256"}))
    elif damage == "unsummed_file":
        del manifest["sha256"][DAMAGED]
        path.write_text(json.dumps(manifest))
    else:
        path.write_text(json.dumps(dict(manifest, version=99)))
    with pytest.raises(ExportError, match="manifest.json") as info:
        load(out, verify="lazy")
    assert info.value.path == path
    if damage == "unsummed_file":
        assert DAMAGED in str(info.value)


def test_verify_must_be_eager_or_lazy(exported):
    with pytest.raises(ValueError, match="verify"):
        load(exported[0], verify="never")


def _legacy_container(exported: jax.export.Exported) -> bytes:
    """An artifact in the pre-checksum fallback container (what old exports hold without flatbuffers)."""

    def tree(t):
        if jax.tree_util.treedef_is_leaf(t) and t.num_leaves == 1:
            return {"k": "leaf"}
        node, aux = t.node_data()
        kids = [tree(c) for c in t.children()]
        kind = {tuple: "tuple", list: "list", dict: "dict"}[node]
        return {"k": kind, "c": kids, **({"keys": list(aux)} if node is dict else {})}

    avals = lambda xs: [{"shape": list(a.shape), "dtype": str(np.dtype(a.dtype))} for a in xs]  # noqa: E731
    header = {
        "fun_name": exported.fun_name, "in_tree": tree(exported.in_tree), "in_avals": avals(exported.in_avals),
        "out_tree": tree(exported.out_tree), "out_avals": avals(exported.out_avals),
        "nr_devices": exported.nr_devices, "platforms": list(exported.platforms),
        "calling_convention_version": exported.calling_convention_version,
        "module_kept_var_idx": list(exported.module_kept_var_idx),
        "uses_global_constants": bool(exported.uses_global_constants),
    }  # fmt: skip
    raw = json.dumps(header).encode()
    return artifact.LEGACY_MAGIC + len(raw).to_bytes(8, "little") + raw + bytes(exported.mlir_module_serialized)


def test_a_version_1_export_loads_unverified_with_a_warning(exported, tmp_path):
    out = _copy(exported, tmp_path)
    _, _, requests, live = exported
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["sha256"]
    (out / "manifest.json").write_text(json.dumps(dict(manifest, version=1)))
    legacy = _legacy_container(jax.export.deserialize(bytearray((out / DAMAGED).read_bytes())))
    (out / DAMAGED).write_bytes(legacy)  # old exports may hold the fallback container: still readable
    with pytest.warns(UserWarning, match="no checksums"):
        scorer = load(out)
    for got, want in zip(scorer.score(requests), live, strict=True):
        for task in SCHEMA.tasks:
            np.testing.assert_allclose(got[task], want[task], atol=1e-6)
