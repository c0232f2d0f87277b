"""What a run reports: phase lines with durations in a log file, TensorBoard events, throughput keys, plots."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from gesr_jax.train import plots, reporting

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = ["train.num_steps=4", "train.log_every=2", "train.eval_every=2", "train.checkpoint_every=2"]


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """`gesr train` of synthetic_tiny with stderr redirected to a file (no terminal), cache in a temp folder."""
    tmp = tmp_path_factory.mktemp("logged")
    # One device (the suite's 8-device flag dropped); the suite's other XLA flags (tests/conftest.py) kept.
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f)
    env = dict(os.environ, XLA_FLAGS=flags, GESR_CACHE_DIR=str(tmp / "cache"), GESR_PROGRESS_EVERY_S="0")
    env.pop("GESR_NO_COMPILATION_CACHE", None)  # this run exercises the cache, in its own folder
    env.pop("CI", None)
    workdir = tmp / "run"
    cmd = [sys.executable, "-m", "gesr_jax", "train", "--config", "synthetic_tiny", "--workdir", str(workdir)]
    cmd += [arg for s in STEPS for arg in ("--set", s)]
    with (tmp / "stderr.log").open("w") as err, (tmp / "stdout.log").open("w") as out:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=out, stderr=err, stdin=subprocess.DEVNULL, check=False)
    log = (tmp / "stderr.log").read_text()
    assert proc.returncode == 0, log[-3000:]
    return workdir, log, tmp


def test_every_phase_says_what_it_does_and_how_long_it_took(logged_run):
    _, log, _ = logged_run
    duration = r": \d+(\.\d+)? (s|min)"
    for phase in ("building data", "initialising the model", "compiling the train step", "evaluating valid",
                  "saving checkpoint 2", "saving checkpoint 4", "evaluating test"):  # fmt: skip
        assert re.search(re.escape(phase) + r".* \.\.\.$", log, re.M), f"no start line for {phase!r}:\n{log}"
        assert re.search(re.escape(phase) + r"[^\n]*" + duration, log), f"no duration for {phase!r}:\n{log}"
    assert re.search(r"backend cpu .*1 device", log), log
    assert re.search(r"training: 4 steps in .*ms/step after the first", log), log
    assert re.search(r"train step 3/4 \(75%\): loss [\d.]+, [\d.]+ ms/step, \d+ requests/s, ETA", log), log
    assert "\r" not in log  # no progress bar in a file


def test_the_compilation_cache_is_filled_in_the_cache_folder(logged_run):
    _, _, tmp = logged_run
    folder = tmp / "cache" / "jax_compilation_cache"
    assert folder.is_dir() and any(folder.iterdir())


def test_tensorboard_events_hold_the_logged_scalars(logged_run):
    workdir, _, _ = logged_run
    scalars = reporting.read_scalars(workdir / reporting.TENSORBOARD_DIR)
    records = plots.read_metrics(workdir / "metrics.jsonl")
    train = [r for r in records if r["split"] == "train"]
    assert [s for s, _ in scalars["train/loss"]] == [r["step"] for r in train] == [2, 4]
    for (_, value), record in zip(scalars["train/loss"], train, strict=True):
        assert value == pytest.approx(record["loss"], rel=1e-6)
    for tag in ("train/learning_rate", "train/grad_norm", "train/sec_per_step", "train/requests_per_sec",
                "train/candidates_per_sec", "valid/consume/ne", "valid/engage/auc", "valid/candidates_per_sec",
                "test/consume/ne", "test/engage/ne"):  # fmt: skip
        assert tag in scalars, sorted(scalars)
    assert [s for s, _ in scalars["valid/consume/ne"]] == [2, 4]


def test_tensorboard_agrees_with_tensorboards_own_reader_when_installed(logged_run):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    workdir, _, _ = logged_run
    acc = event_accumulator.EventAccumulator(str(workdir / reporting.TENSORBOARD_DIR))
    acc.Reload()
    ours = reporting.read_scalars(workdir / reporting.TENSORBOARD_DIR)
    assert [(e.step, pytest.approx(e.value)) for e in acc.Scalars("train/loss")] == ours["train/loss"]


def test_throughput_keys_say_what_they_count(logged_run):
    workdir, _, _ = logged_run
    records = plots.read_metrics(workdir / "metrics.jsonl")
    config = json.loads((workdir / "config.json").read_text())
    for record in records:
        assert "examples_per_sec" not in record
        assert record["requests_per_sec"] > 0 and record["candidates_per_sec"] > 0, record
        # synthetic_tiny: every request has num_positives + num_negatives candidate slots or fewer
        slots = config["data"]["num_positives"] + config["data"]["num_negatives"]
        assert record["candidates_per_sec"] <= slots * record["requests_per_sec"] * (1 + 1e-9)
    results = json.loads((workdir / "results.json").read_text())
    assert {"requests_per_sec", "candidates_per_sec"} <= set(results["test"])


def test_plots_mark_every_evaluation(logged_run, tmp_path):
    workdir, _, _ = logged_run
    paths = plots.write_plots(workdir / "metrics.jsonl", tmp_path, None)
    assert [p.name for p in paths] == ["loss.png", "ne.png"] and all(p.stat().st_size > 1000 for p in paths)


def test_compare_runs_overlays_workdirs(logged_run, tmp_path):
    workdir, _, _ = logged_run
    spec = importlib.util.spec_from_file_location("compare_runs", ROOT / "experiments" / "compare_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "fig.png"
    assert module.main([str(workdir), str(workdir), "--label", "a", "--label", "b", "--out", str(out)]) == 0
    assert out.stat().st_size > 1000
    assert module.main([str(tmp_path), "--out", str(out)]) == 2  # not a workdir


def test_fit_ylim_gives_one_point_a_readable_range():
    from matplotlib.figure import Figure

    ax = Figure().add_subplot()
    ax.plot([5], [0.8], "o")
    plots.fit_ylim(ax, [0.8])
    low, high = ax.get_ylim()
    assert low < 0.8 < high and high - low < 0.1


def test_reporter_lines_and_phases(capsys, monkeypatch):
    # A clock the test moves, not wall time: the tally is checked exactly and cannot depend on the box's load.
    now = [100.0]
    monkeypatch.setattr(reporting.time, "perf_counter", lambda: now[0])
    reporter = reporting.Reporter(enabled=True)
    with reporter.phase("doing a thing") as info:
        info["detail"] = "3 items"
        now[0] += 2.5
    now[0] += 50.0  # time outside phases is not counted
    with reporter.phase("outer"):
        now[0] += 3.0
        with reporter.phase("inner"):  # nested: counted once, inside the outer phase
            now[0] += 4.0
    err = capsys.readouterr().err.splitlines()
    assert err[0].endswith("doing a thing ...") and re.search(r"doing a thing: [\d.]+ s \(3 items\)$", err[1])
    assert reporter.phase_seconds >= 0
    assert reporter.phase_seconds == 2.5 + 7.0
    monkeypatch.undo()
    assert reporting.format_duration(75) == "1 min 15 s" and reporting.format_duration(3725) == "1 h 02 min"
    silent = reporting.Reporter(enabled=False)
    with silent.phase("quiet"):
        pass
    assert capsys.readouterr().err == ""
