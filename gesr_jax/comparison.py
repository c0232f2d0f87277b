"""Train several variants of one experiment and tabulate them against a baseline, paired by seed.

Used by ``experiments/demo.py`` (two-tower vs GESR) and ``experiments/ablations.py``
(GESR with one MoA component removed at a time). Each variant is a config plus
``--set`` overrides; each (variant, seed) trains in its own workdir. Seed ``s`` sets both
``train.seed = s`` (init, dropout and data order) and ``data.seed = s`` (MovieLens negatives and
candidate order, in every split); the synthetic log depends only on ``data.synthetic.seed``, so it
stays the same across seeds there. The baseline and every variant share each seed, so the table
reports the **paired** relative NE change: per seed ``(NE_variant - NE_base) / NE_base * 100``
(the GESR paper's unit, negative is better), as mean ± 95% Student-t CI half-width over seeds,
marked "n.s." when the CI holds 0 (gesr_jax/statistics.py). It also shows test NE and AUC (mean ±
CI), the trainer's best-valid step when it reports one (``best_step``), and the training loop's time.
Beside every ΔNE: the paired ΔAUC (and ΔgAUC when the runs record ``<task>/gauc``), the recalibrated ΔNE
when the runs record ``<task>/ne_recal`` (test NE after an intercept fitted on valid), and a verdict
column: "better"/"worse" only when all these agree (gesr_jax/calibration.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gesr_jax import calibration, config as config_lib, sidecar, statistics


@dataclasses.dataclass(frozen=True)
class Variant:
    label: str  # row name in the table, e.g. "GESR without HMA"
    config: str  # preset name or .py path, e.g. "synthetic_base_two_tower"
    overrides: tuple[str, ...] = ()  # `--set` style overrides applied on top


DEFAULT_SEEDS: tuple[int, ...] = (0, 1, 2, 3, 4)  # comparison tables pair >= 5 seeds unless told otherwise


@dataclasses.dataclass
class VariantResult:
    variant: Variant
    runs: list[dict[str, Any]]  # one train_and_evaluate() result per seed
    train_seconds: list[float]  # training-loop seconds per seed, from the trainer's metrics.jsonl
    seeds: list[int] = dataclasses.field(default_factory=list)  # the seed of each run, in order

    def metric(self, split: str, key: str) -> np.ndarray:
        return np.array([run[split][key] for run in self.runs], dtype=np.float64)

    def best_steps(self) -> list[int | None]:
        """The trainer's best-valid step per run (``best_step`` in results.json), None where absent."""
        return [run.get("best_step") for run in self.runs]


def default_runs_root() -> pathlib.Path:
    """Where the experiment scripts keep their run folders: ``$GESR_CACHE_DIR/runs``, else ~/.cache/gesr_jax/runs.

    Persistent (not /tmp), so per-seed runs survive a reboot and a table's intervals can be recomputed.
    """
    cache = os.environ.get("GESR_CACHE_DIR")
    base = pathlib.Path(cache).expanduser() if cache else pathlib.Path.home() / ".cache" / "gesr_jax"
    return base / "runs"


def seed_overrides(seed: int) -> tuple[str, ...]:
    """What one comparison seed sets: the model seed and the data (negative-sampling) seed."""
    return (f"train.seed={seed}", f"data.seed={seed}")


def run_variants(
    variants: Sequence[Variant],
    workdir: str | pathlib.Path,
    *,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    extra_overrides: Sequence[str] = (),
    train_fn: Callable[..., dict[str, Any]] | None = None,
    log: Callable[[str], None] = print,
    reuse_results: bool = True,
    prediction_metrics: bool = False,
) -> list[VariantResult]:
    """Train every variant for every seed (:func:`seed_overrides`) in ``workdir/<label>/seed<k>``; resume-safe.

    A run folder that already holds a finished run of the same config (``results.json`` beside a
    ``config.json`` equal to this one) is read back, not trained or evaluated again, when
    ``reuse_results``; so several tables can share runs. Any other existing folder goes to ``train_fn``
    (the trainer resumes it, or refuses a different config). ``prediction_metrics`` adds each run's
    recalibrated NE and tenure strata (gesr_jax/run_predictions.py, cached in the run folder); a run that
    cannot be restored for them is named in the log and its row simply lacks those columns.
    """
    if train_fn is None:
        from gesr_jax.train.trainer import train_and_evaluate as train_fn
    workdir = pathlib.Path(workdir)
    results = []
    for variant in variants:
        runs, seconds = [], []
        for seed in seeds:
            overrides = (*variant.overrides, *extra_overrides, *seed_overrides(seed))
            config = config_lib.load_config(variant.config, overrides)
            run_dir = workdir / _slug(variant.label) / f"seed{seed}"
            start = time.perf_counter()
            finished = _finished_run(run_dir, config) if reuse_results else None
            if finished is not None:
                log(f"[{variant.label}] seed {seed}: reusing the finished run in {run_dir}")
                runs.append(finished)
            else:
                log(f"[{variant.label}] seed {seed}: training {config.name} in {run_dir}")
                runs.append(train_fn(config, run_dir))
            if prediction_metrics:
                runs[-1] = _with_prediction_metrics(run_dir, runs[-1], log)
            seconds.append(_loop_seconds(run_dir, default=time.perf_counter() - start))
        results.append(VariantResult(variant, runs, seconds, list(seeds)))
    return results


def _with_prediction_metrics(run_dir: pathlib.Path, record: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    from gesr_jax import run_predictions
    from gesr_jax.workdir import WorkdirError

    try:
        extra = run_predictions.load_or_compute(run_dir, record.get("best_step"))
    except (WorkdirError, FileNotFoundError, ValueError) as err:
        log(f"no recalibrated NE / strata for {run_dir}: {err}")
        return record
    return run_predictions.merged(record, extra)


def _finished_run(run_dir: pathlib.Path, config: Any) -> dict[str, Any] | None:
    """``results.json`` of ``run_dir`` when it is a finished run of exactly ``config``, else None."""
    results, saved = run_dir / "results.json", run_dir / "config.json"
    if not (results.exists() and saved.exists()):
        return None
    try:
        same = config_lib.load_json(saved) == config
    except (config_lib.ConfigError, ValueError, TypeError):
        return None
    return json.loads(results.read_text()) if same else None


def write_report(
    path: str | pathlib.Path, lines: Sequence[str], results: Sequence[VariantResult] | None = None
) -> pathlib.Path:
    """Write a markdown report (one string per line), echo it, and say where it went.

    With ``results``, also the per-seed sidecar ``<path>.json`` (:func:`write_sidecar`).
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {path}")
    if results is not None:
        print(f"wrote {write_sidecar(path.with_suffix('.json'), results)}")
    return path


def write_sidecar(path: str | pathlib.Path, results: Sequence[VariantResult]) -> pathlib.Path:
    """Per row and seed: valid and test metrics, best step, config hash, train time (JSON); :func:`read_sidecar`
    rebuilds the :class:`VariantResult` list, so a table (and its intervals) is recomputed without the run folders
    (gesr_jax/sidecar.py: the file's form and size limit)."""
    rows = []
    for res in results:
        seeds = res.seeds or list(range(len(res.runs)))
        records = []
        for seed, run, seconds in zip(seeds, res.runs, res.train_seconds):
            config = config_lib.load_config(res.variant.config, (*res.variant.overrides, *seed_overrides(seed)))
            records.append({
                "seed": seed, "best_step": run.get("best_step"), "step": run.get("step"),
                "config_hash": sidecar.config_hash(config), "train_seconds": seconds,
                "valid": run.get("valid", {}), "test": run.get("test", {}),
                **({"test_users": run["test_users"]} if "test_users" in run else {}),
            })  # fmt: skip
        rows.append({"label": res.variant.label, "config": res.variant.config,
                     "overrides": list(res.variant.overrides), "runs": records})  # fmt: skip
    return sidecar.write(path, rows)  # over sidecar.MAX_SIDECAR_BYTES without the per-test-user sums


def read_sidecar(path: str | pathlib.Path) -> list[VariantResult]:
    """The rows of a sidecar written by :func:`write_sidecar`, ready for :func:`comparison_table`."""
    data = json.loads(pathlib.Path(path).read_text())
    if data.get("version") != sidecar.SIDECAR_VERSION:
        raise ValueError(f"{path}: sidecar version {data.get('version')!r}, expected {sidecar.SIDECAR_VERSION}")
    out = []
    for row in data["rows"]:
        variant = Variant(row["label"], row["config"], tuple(row["overrides"]))
        runs = [{k: r[k] for k in ("valid", "test", "best_step", "step", "test_users") if k in r} for r in row["runs"]]
        seconds = [float(r["train_seconds"]) for r in row["runs"]]
        out.append(VariantResult(variant, runs, seconds, [int(r["seed"]) for r in row["runs"]]))
    return out


def _loop_seconds(run_dir: pathlib.Path, default: float) -> float:
    """The trainer's own clock for the training loop (last train record of metrics.jsonl).

    It counts compilation, periodic eval and checkpoints but not data loading or the final eval,
    and it survives re-running a finished workdir (which only restores and re-evaluates).
    """
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return default
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("split") == "train" and "wall_time" in r]
    return float(train[-1]["wall_time"]) if train else default


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label.lower()).strip("_")


def _mean_ci(values: np.ndarray, digits: int) -> str:
    mean, half = statistics.mean_ci(values)
    return f"{mean:.{digits}f}" if not math.isfinite(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def paired_delta(base: VariantResult, variant: VariantResult, key: str, split: str = "test") -> np.ndarray:
    """Per-seed relative change of metric ``key`` (%), checking that both results ran the same seeds."""
    if base.seeds and variant.seeds and base.seeds != variant.seeds:
        raise ValueError(
            f"{variant.variant.label!r} ran seeds {variant.seeds} but the baseline ran {base.seeds}: not paired"
        )
    return statistics.paired_relative_delta(base.metric(split, key), variant.metric(split, key))


def comparison_table(
    results: Sequence[VariantResult],
    tasks: Sequence[str],
    split: str = "test",
    references: dict[str, dict[str, float]] | None = None,
    also_vs: str | None = None,
) -> str:
    """A markdown table; ΔNE is paired per seed against ``results[0]`` (see the module docstring).

    ``references`` adds rows that were not trained, label -> task -> NE (e.g. the synthetic log's
    decoupled ceiling); the oracle row comes from the runs' ``<task>/oracle_ne`` when present. Their
    ΔNE is against the baseline's per-seed NE, like every other row. ``also_vs`` names a second row (e.g.
    "GESR (all on)" in an ablation table) every trained row is also paired with: ΔNE, ΔAUC, verdict.
    """
    base, second = results[0], None
    if also_vs is not None:
        second = next((res for res in results if res.variant.label == also_vs), None)
        if second is None:
            raise ValueError(f"also_vs={also_vs!r} is not a row; rows: {[r.variant.label for r in results]}")
    header = ["model"]
    has_gauc = all(f"{t}/gauc" in run[split] for t in tasks for res in results for run in res.runs)
    has_recal = all(f"{t}/ne_recal" in run[split] for t in tasks for res in results for run in res.runs)
    has_boot = split == "test" and all(t in run.get("test_users", {}) for t in tasks for res in results for run in res.runs)
    for task in tasks:
        header += [f"NE {task}", f"ΔNE {task} vs {base.variant.label} (%, paired)"]
        header += [f"ΔNE {task} vs {also_vs} (%, paired)", f"ΔAUC {task} vs {also_vs} (points, paired)",
                   f"verdict {task} vs {also_vs}"] if second is not None else []  # fmt: skip
        header += [f"AUC {task}", f"ΔAUC {task} (points, paired)"] + ([f"ΔgAUC {task} (points, paired)"] if has_gauc else [])
        header += [f"recal. ΔNE {task} (%, intercept fitted on valid)"] if has_recal else []
        header += [f"ΔNE {task} (%, 95% bootstrap over test users, seed-averaged)"] if has_boot else []
        header += [f"verdict {task} vs {base.variant.label}"]
    show_best = any(step is not None for res in results for step in res.best_steps())
    header += (["best valid step"] if show_best else []) + ["train time (s)"]
    rows = [header, ["---"] * len(header)]
    for res in results:
        row = [res.variant.label]
        for task in tasks:
            rel = paired_delta(base, res, f"{task}/ne", split)
            delta = "0 (baseline)" if res is base else statistics.format_delta(*statistics.mean_ci(rel))
            row += [_mean_ci(res.metric(split, f"{task}/ne"), 4), delta]
            if second is not None:
                row += _reference_cells(second, res, task, split, has_recal)
            row.append(_mean_ci(res.metric(split, f"{task}/auc"), 4))
            row += _calibration_cells(base, res, task, split, has_gauc, has_recal)
        if show_best:
            row.append(", ".join("—" if s is None else str(s) for s in res.best_steps()))
        row.append(_mean_ci(np.array(res.train_seconds), 0))
        rows.append(row)
    extra = dict(references or {})
    oracle_keys = [f"{t}/oracle_ne" for t in tasks]
    if all(k in base.runs[0][split] for k in oracle_keys):
        oracle = {t: float(base.metric(split, f"{t}/oracle_ne").mean()) for t in tasks}
        extra = {"oracle (true probabilities)": oracle} | extra
    for label, values in extra.items():
        row = [label]
        for task in tasks:
            ne = values.get(task, math.nan)
            rel = statistics.paired_relative_delta(base.metric(split, f"{task}/ne"), np.full(len(base.runs), ne))
            row += [f"{ne:.4f}", statistics.format_delta(*statistics.mean_ci(rel))] + (["—"] * 3 if second else []) + ["—"]
            row += ["—"] * (2 + has_gauc + has_recal + has_boot)
        row += (["—"] if show_best else []) + ["—"]
        rows.append(row)
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def _calibration_cells(
    base: VariantResult, res: VariantResult, task: str, split: str, has_gauc: bool, has_recal: bool
) -> list[str]:
    """ΔAUC, ΔgAUC, recalibrated ΔNE and the verdict of ``res`` against ``base`` (gesr_jax/calibration.py)."""
    n_cells = 2 + has_gauc + has_recal
    boot = calibration.bootstrap_cell(base.runs, res.runs, task)
    if res is base:
        return ["0 (baseline)"] * (n_cells - 1) + (["0 (baseline)"] if boot is not None else []) + ["—"]
    paired_delta(base, res, f"{task}/ne", split)  # checks the pairing
    keys = [f"{task}/{m}" for m in ("ne", "auc", *(["gauc"] if has_gauc else []), *(["ne_recal"] if has_recal else []))]
    deltas = calibration.paired_deltas({k: base.metric(split, k) for k in keys}, {k: res.metric(split, k) for k in keys}, task)
    cells = [statistics.format_delta(*deltas["ΔAUC"])]
    cells += [statistics.format_delta(*deltas["ΔgAUC"])] if has_gauc else []
    cells += [statistics.format_delta(*deltas["recal. ΔNE"])] if has_recal else []
    cells += [boot] if boot is not None else []
    return cells + [calibration.verdict(deltas["ΔNE"], deltas["ΔAUC"], deltas.get("recal. ΔNE"),
                                        recal_applies=split == "test")]  # fmt: skip


def _reference_cells(ref: VariantResult, res: VariantResult, task: str, split: str, has_recal: bool) -> list[str]:
    """ΔNE, ΔAUC and the verdict of ``res`` against the ``also_vs`` row (e.g. an ablation vs GESR all on)."""
    if res is ref:
        return ["0 (reference)", "0 (reference)", "—"]
    paired_delta(ref, res, f"{task}/ne", split)  # checks the pairing
    keys = [f"{task}/{m}" for m in ("ne", "auc", *(["ne_recal"] if has_recal else []))]
    d = calibration.paired_deltas({k: ref.metric(split, k) for k in keys}, {k: res.metric(split, k) for k in keys}, task)
    fmt = statistics.format_delta
    verdict = calibration.verdict(d["ΔNE"], d["ΔAUC"], d.get("recal. ΔNE"), recal_applies=split == "test")
    return [fmt(*d["ΔNE"]), fmt(*d["ΔAUC"]), verdict]


def gap_closed(
    base: VariantResult, variant: VariantResult, task: str, split: str = "test", floor: float | None = None
) -> tuple[float, float]:
    """Share of the baseline-to-floor gap the variant closes, per seed, as (mean, 95% CI half-width).

    Per seed ``(NE_base - NE_variant) / (NE_base - floor)``; ``floor`` defaults to each run's oracle
    NE (``<task>/oracle_ne``, synthetic data). 1 = the variant reaches the floor, 0 = no better than
    the baseline. E.g. demo.py: ``gap_closed(two_tower, gesr, "consume")``.
    """
    paired_delta(base, variant, f"{task}/ne", split)  # checks the pairing
    ne_base, ne_variant = base.metric(split, f"{task}/ne"), variant.metric(split, f"{task}/ne")
    lower = base.metric(split, f"{task}/oracle_ne") if floor is None else np.full(ne_base.shape, floor)
    return statistics.mean_ci((ne_base - ne_variant) / (ne_base - lower))


def dataset_references(config: Any, split: str = "test") -> dict[str, dict[str, float]]:
    """Reference NEs of a config's dataset that no run trains for: the synthetic log's decoupled ceiling.

    Pass the result to :func:`comparison_table` as ``references``. Empty for MovieLens (no ground truth).
    """
    if config.data.source != "synthetic":
        return {}
    from gesr_jax.data import synthetic

    _, stats, _ = synthetic.generate(config.data)
    ceiling = {}
    for key, value in stats.items():
        prefix, suffix = "decoupled_ceiling_ne_", f"_{split}"
        if key.startswith(prefix) and key.endswith(suffix):
            ceiling[key[len(prefix) : -len(suffix)]] = float(value)
    return {"decoupled ceiling (true base + pooled history, fitted)": ceiling} if ceiling else {}


def data_description(config: Any) -> str:
    """One line naming the data a table was computed on, with the counts the loader saw.

    MovieLens: ``"ML-1M (users 1–2999): 2,999 users, 487,650 ratings; split global_time_user_holdout"``: the
    folder's name, the user-id range when the log holds fewer users than the users file lists (a partial copy),
    the distinct users and ratings of the log (:meth:`gesr_jax.data.movielens.Interactions.seen`) and the
    request split (data.movielens.split). Other sources: their name.
    """
    data = config.data
    if data.source != "movielens":
        return f"{data.source} data (config {config.name})"
    from gesr_jax.data import movielens, movielens_dataset

    try:
        inter = movielens_dataset.load_interactions_cached(data)
    except (OSError, movielens.DataFormatError) as err:  # a table about runs whose data folder is gone
        folder = data.movielens.path
        return f"{pathlib.Path(folder).name} at {folder}: not readable here, counts unknown ({err})"
    described = describe_interactions(inter.seen(), inter.num_users, pathlib.Path(data.movielens.path).name)
    return f"{described}; split {data.movielens.split}"


def describe_interactions(seen: dict[str, int], num_listed_users: int, folder: str) -> str:
    """The text of :func:`data_description` from ``Interactions.seen()`` counts (split out to test without data)."""
    name = folder.upper() if folder.lower().startswith("ml-") else folder
    lo, hi = seen["user_id_min"], seen["user_id_max"]
    partial = seen["users"] < num_listed_users or hi < num_listed_users
    label = f"{name} (users {lo}–{hi})" if partial else name
    return f"{label}: {seen['users']:,} users, {seen['ratings']:,} ratings"


def is_finite_table(results: Sequence[VariantResult], tasks: Sequence[str], split: str = "test") -> bool:
    return all(math.isfinite(v) for r in results for t in tasks for v in r.metric(split, f"{t}/ne"))
