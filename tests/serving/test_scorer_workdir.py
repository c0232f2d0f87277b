"""Serving a trained workdir: Scorer.from_workdir, FP8 ΔNE, export_workdir + load round trip, `gesr export`.

One tiny synthetic GESR (synthetic_tiny with embed 64 so some kernels reach FP8's 4096-entry threshold) is
trained for 50 steps once per module (about 25 s on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from gesr_jax import api, cascade, metrics
from gesr_jax import config as config_lib
from gesr_jax.data import datasets
from gesr_jax.serving.buckets import Buckets
from gesr_jax.serving.export import export_workdir, register_cli
from gesr_jax.serving.loader import load
from gesr_jax.serving.requests import requests_from_batch
from gesr_jax.serving.scorer import Scorer
from gesr_jax.train.checkpoint_errors import CheckpointNotFoundError, CheckpointWarning
from gesr_jax.train.trainer import train_and_evaluate
from gesr_jax.workdir import Workdir
from gesr_jax.workdir_files import WorkdirError

BUCKETS = Buckets((1, 16), (16,))
OVERRIDES = ["model.embed_dim=64", "model.tower_mlp=128,64", "train.num_steps=50", "train.checkpoint_every=25",
             "train.eval_every=0", "train.log_every=50"]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    config = config_lib.load_config("synthetic_tiny", OVERRIDES)
    workdir = tmp_path_factory.mktemp("serve") / "run"
    train_and_evaluate(config, workdir)
    splits = datasets.load_splits(config.data)
    return workdir, splits


@pytest.fixture(scope="module")
def scorer(trained):
    return Scorer.from_workdir(trained[0], buckets=BUCKETS)


def _ne(results, split, task) -> float:
    counts = split["num_candidates"]
    probs = np.concatenate([r[task] for r in results])
    labels = np.concatenate([split[f"label_{task}"][i, : counts[i]] for i in range(len(results))])
    return float(metrics.normalized_entropy(labels, probs))


def test_from_workdir_restores_the_checkpoint_and_equals_apply(trained, scorer):
    _, splits = trained
    assert (scorer.step, scorer.kind) == (50, "gesr") and scorer.item_cache is not None
    batch = {k: v[:20] for k, v in splits.test.items()}
    ref = api.apply(scorer.graphdef, scorer.params, batch)
    for row, result in enumerate(scorer.score(requests_from_batch(batch, splits.schema))):
        c = batch["num_candidates"][row]
        for task in splits.schema.tasks:
            np.testing.assert_allclose(result[task], np.asarray(jax.nn.sigmoid(ref[task][row, :c])), atol=1e-5)


def test_from_workdir_refuses_a_workdir_of_another_model_api(trained, tmp_path):
    workdir, _ = trained
    other = tmp_path / "other"
    shutil.copytree(workdir, other)
    record = json.loads((other / "model.json").read_text())
    (other / "model.json").write_text(json.dumps(record | {"api": "my_pkg.my_api"}))
    with pytest.raises(WorkdirError, match="my_pkg.my_api"):
        Scorer.from_workdir(other)


def test_scorer_cascade_and_export_pick_the_step_by_the_workdir_rule(trained, tmp_path):
    other = tmp_path / "w"
    shutil.copytree(trained[0], other)
    assert Workdir(other).best_step() == 50 and Scorer.from_workdir(other).step == 50
    (other / "best.json").write_text(json.dumps({"step": 25}))
    assert cascade.load_run(other).step == Scorer.from_workdir(other).step == 25
    assert Scorer.from_workdir(other, "last").step == 50
    shutil.rmtree(other / "checkpoints" / "25")  # the best step is gone: the newest intact one, with a warning
    with pytest.warns(CheckpointWarning, match="best step 25 cannot be used"):
        assert cascade.load_run(other).step == 50
    with pytest.raises(CheckpointNotFoundError):
        Scorer.from_workdir(other, strict=True)


def test_fp8_delta_ne_on_a_trained_model_stays_within_0_25_percent(trained, scorer):
    _, splits = trained
    fp8 = Scorer.from_workdir(trained[0], buckets=BUCKETS, fp8=True)  # default: kernels of >= 4096 entries
    assert any(x.dtype == jax.numpy.float8_e4m3fn for x in jax.tree.leaves(fp8.params))
    requests = requests_from_batch(splits.test, splits.schema)
    base, quantised = scorer.score(requests), fp8.score(requests)
    for task in splits.schema.tasks:
        ne, ne_fp8 = _ne(base, splits.test, task), _ne(quantised, splits.test, task)
        # Measured |ΔNE| on this fixture over training seeds 0-2: 0.04-0.18 % (consume), 0.01-0.11 % (engage) with
        # the named RNG streams; 0.045 / 0.055 % (consume) on seeds 0-1 under the old build-order init. 0.25 % bounds
        # them with room; the old 0.05 % bound held for the old init's seed 0 only.
        assert abs(ne_fp8 - ne) / ne < 2.5e-3, (task, ne, ne_fp8)


_LOADER = textwrap.dedent(
    """
    import importlib.abc, sys
    FORBIDDEN = ("gesr_jax.models", "gesr_jax.api", "gesr_jax.train", "flax")

    class Guard(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.startswith(FORBIDDEN):
                raise ImportError(f"the serving loader imported {name}")
            return None

    sys.meta_path.insert(0, Guard())
    import numpy as np
    from gesr_jax.serving.loader import load
    scorer = load(sys.argv[1])
    data = np.load(sys.argv[2])
    n = int(data["n"])
    requests = [{k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(f"{i}/")} for i in range(n)]
    results = scorer.score(requests)
    np.savez(sys.argv[3], **{f"{i}/{t}": r[t] for i, r in enumerate(results) for t in r})
    assert not [m for m in sys.modules if m.startswith(FORBIDDEN)]
    print("loaded", scorer.kind, scorer.manifest["platforms"])
    """
)


def test_export_round_trip_equals_the_live_scorer_without_model_code(trained, scorer, tmp_path):
    workdir, splits = trained
    out = tmp_path / "export"
    manifest = export_workdir(workdir, out, buckets=BUCKETS)
    assert manifest["model_kind"] == "gesr" and manifest["buckets"] == BUCKETS.to_dict()
    assert "cpu" in manifest["platforms"] and manifest["source"]["step"] == 50
    assert sorted(manifest["files"]["score"]) == ["16x16", "1x16"]
    requests = requests_from_batch({k: v[:5] for k, v in splits.test.items()}, splits.schema)
    requests[2] = dict(requests[2], cand_item=np.arange(1, 41, dtype=np.int32))  # 40 candidates: 3 chunks
    requests[2] = {k: v for k, v in requests[2].items() if not k.startswith("cand_") or k == "cand_item"}
    live = scorer.score(requests)

    exported = load(out)
    for a, b in zip(live, exported.score(requests), strict=True):
        for task in splits.schema.tasks:
            np.testing.assert_allclose(b[task], a[task], atol=1e-6)

    # In a fresh process that cannot import the model code.
    np.savez(tmp_path / "requests.npz", n=len(requests),
             **{f"{i}/{k}": np.asarray(v) for i, r in enumerate(requests) for k, v in r.items()})  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[2]))
    proc = subprocess.run(
        [sys.executable, "-c", _LOADER, str(out), str(tmp_path / "requests.npz"), str(tmp_path / "out.npz")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")
    for i, a in enumerate(live):
        for task in splits.schema.tasks:
            np.testing.assert_allclose(got[f"{i}/{task}"], a[task], atol=1e-6)


def test_gesr_export_command(trained, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="gesr")
    register_cli(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "cli_export"
    args = parser.parse_args(["export", "--workdir", str(trained[0]), "--out", str(out), "--request-buckets", "2",
                              "--chunk-buckets", "8", "--platforms", "cpu"])  # fmt: skip
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["platforms"] == ["cpu"] and printed["buckets"] == {"request_sizes": [2], "chunk_sizes": [8]}
    assert sorted(p.name for p in out.iterdir()) == [
        "encode_r2.jaxexp", "item_table.npz", "manifest.json", "params.npz", "score_r2_c8.jaxexp",
    ]  # fmt: skip
