"""``gesr data download``, ``gesr data inspect`` and ``gesr data prepare``.

``prepare --config NAME --out DIR`` writes the requests of a preset as a prepared folder
(gesr_jax/data/prepared.py); train from it with ``--set data.prepared=DIR``.
:func:`register` adds the subcommands to the ``data`` group of the main CLI; each parser sets
``func`` to a handler ``(argparse.Namespace) -> int`` exit code. Run alone with
``python -m gesr_jax.data.commands inspect --path DIR``. ``inspect --config NAME`` builds the requests
with that preset's data settings (any ``data.source``) and adds the feature health report
(gesr_jax/data/health.py) for the preset's HMA pairs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from gesr_jax.data import download as download_lib
from gesr_jax.data import datasets, movielens, movielens_dataset
from gesr_jax.data.config import DataConfig, MovieLensConfig

USAGE_ERROR = 2  # the CLI's exit code for usage, config and data errors (bad data is the caller's input)


def register(subparsers: Any) -> None:
    """Add ``download`` and ``inspect`` to an ``argparse`` subparsers object."""
    p = subparsers.add_parser("download", help="fetch an official MovieLens zip, check its sha256, unpack it")
    p.add_argument("name", help=f"dataset: one of {', '.join(sorted(download_lib.REGISTRY))}")
    p.add_argument("--to", required=True, help="folder to unpack into (the dataset lands in TO/<its folder>)")
    p.add_argument("--sha256", help="expected sha256 of the zip (overrides the pinned one)")
    p.add_argument("--no-verify", action="store_true", help="skip the hash check; the computed sha256 is printed")
    p.add_argument("--base-url", help=f"fetch {{BASE_URL}}/NAME.zip instead of {download_lib.OFFICIAL_BASE_URL}")
    p.set_defaults(func=run_download)

    p = subparsers.add_parser("inspect", help="print one JSON object describing a MovieLens folder or a preset's data")
    p.add_argument("--path",
                   help="MovieLens folder (ml-1m, ml-100k, ml-latest-small, ...); with --config: data.movielens.path")
    p.add_argument("--config", help="preset (or .py file) whose data settings build the requests, e.g. ml1m_base or "
                   "synthetic_tiny; implies --requests and adds per-split feature health")  # fmt: skip
    p.add_argument("--requests", action="store_true", help="also build the ESR requests and report split sizes")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="data.KEY=VALUE",
        help="DataConfig override for the request counts, e.g. --set data.num_positives=8",
    )
    p.set_defaults(func=run_inspect)

    p = subparsers.add_parser("prepare", help="build a preset's requests once and write them as memory-mappable files")
    p.add_argument("--config", required=True, help="preset (or .py file) whose data settings build the requests")
    p.add_argument("--out", required=True, help="new folder to write (train from it with --set data.prepared=OUT)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="data.KEY=VALUE",
                   help="config override, e.g. --set data.movielens.path=/data/ml-20m")  # fmt: skip
    p.set_defaults(func=run_prepare)


def run_download(args: argparse.Namespace) -> int:
    try:
        download_lib.download(
            args.name,
            args.to,
            sha256=args.sha256,
            verify=not args.no_verify,
            base_url=args.base_url,
            log=lambda msg: print(msg, file=sys.stderr),
        )
    except download_lib.DownloadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from gesr_jax.config import ConfigError, apply_overrides

    try:
        if args.config is not None:
            return _inspect_preset(args)
        if args.path is None:
            raise ConfigError("inspect needs --path DIR (a MovieLens folder) or --config NAME (a preset)")
        overrides = [o.removeprefix("data.") for o in args.overrides]
        settings = MovieLensConfig(path=args.path)
        data_config = apply_overrides(DataConfig(source="movielens", movielens=settings), overrides)
        report = inspect(data_config, build_requests=args.requests)
    except (ConfigError, datasets.DataError, movielens.DataFormatError) as err:  # usage errors; bugs keep a traceback
        print(f"error: {err}", file=sys.stderr)
        return USAGE_ERROR
    print(json.dumps(report))
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    """``gesr data prepare``: progress and phase durations on stderr, the manifest's summary on stdout."""
    from gesr_jax.config import ConfigError, load_config
    from gesr_jax.data import prepared

    try:
        config = load_config(args.config, args.overrides)
        manifest = prepared.prepare(config.data, args.out)
    except (ConfigError, datasets.DataError, movielens.DataFormatError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return USAGE_ERROR
    summary = {k: manifest[k] for k in ("layout", "stats", "phases")}
    summary["bytes"] = sum(f["bytes"] for f in manifest["files"].values())
    print(json.dumps({"prepared": args.out, **summary}))
    return 0


def _inspect_preset(args: argparse.Namespace) -> int:
    """``inspect --config NAME``: the preset's data (after ``--set``, ``data.`` prefix optional), requests, health."""
    from gesr_jax.config import load_config

    overrides = [o if o.split("=", 1)[0].count(".") and o.split(".", 1)[0] in ("data", "model", "train")
                 else f"data.{o}" for o in args.overrides]  # fmt: skip
    if args.path is not None:
        overrides.append(f"data.movielens.path={args.path}")
    config = load_config(args.config, overrides)
    print(json.dumps(inspect_config(config)))
    return 0


def inspect_config(config: Any) -> dict[str, Any]:
    """Requests, schema and feature health of ``config.data`` (and the folder counts for MovieLens)."""
    from gesr_jax.data import health

    data_config = config.data
    report: dict[str, Any] = {"config": config.name, "source": data_config.source}
    if data_config.source == "movielens":
        report |= inspect(data_config)
    splits = datasets.load_splits(data_config)
    report["requests"] = splits.stats
    report["split_shares"] = split_shares(splits.stats)
    report["schema"] = dataclasses.asdict(splits.schema)
    fields = ("item", *splits.schema.item_feature_names)
    hma = getattr(config.model, "hma", None)  # GESR's model.hma section; other kinds have none
    pairs = tuple(getattr(hma, "pairs", ())) or tuple(
        (f, f) for f in fields
    )  # a model without HMA: every same-name pair, to show which would match
    for name in (f for pair in pairs for f in pair):
        if name not in fields:  # the same one line `gesr train` gives (gesr_jax/models/gesr/tokens.py)
            raise datasets.DataError(
                f"model.hma.pairs names {name!r}, which this dataset does not have; available: {list(fields)}"
            )
    report["health"] = health.feature_health(splits, pairs)
    return report


def inspect(data_config: DataConfig, build_requests: bool = False) -> dict[str, Any]:
    """Counts for a MovieLens folder: format, ratings, users, items, time range, users skipped, ...

    ``skipped_users`` counts users with fewer events than one request needs under ``data_config``
    (``min_history + num_positives``); with ``build_requests`` the requests are built and the
    exact counts (which also drop requests whose history is hidden by same-second ratings) are
    reported under ``requests``.
    """
    inter = movielens_dataset.load_interactions_cached(data_config)
    per_user = np.bincount(inter.user)
    per_user = per_user[per_user > 0]
    needed = data_config.min_history + data_config.num_positives
    stars, counts = np.unique(inter.rating, return_counts=True)
    report: dict[str, Any] = {
        "format": inter.format,
        "path": str(inter.files.root),
        "ratings": int(inter.user.size),
        "users": int(per_user.size),
        "items": int(np.unique(inter.item).size),
        "movies_listed": int(inter.item_known.sum()),
        "first_timestamp": int(inter.timestamp.min()),
        "last_timestamp": int(inter.timestamp.max()),
        "ratings_by_star": {f"{s:g}": int(c) for s, c in zip(stars, counts)},
        "events_per_user": {
            "min": int(per_user.min()),
            "median": float(np.median(per_user)),
            "max": int(per_user.max()),
        },
        "events_needed_per_request": needed,
        "skipped_users": int(np.count_nonzero(per_user < needed)),
        "user_features": sorted(inter.user_features),
        "directors": len(inter.director_names),
        "tags": inter.num_tags,
        "ratings_file": inter.files.ratings.name,
    }
    if build_requests:
        splits = datasets.load_splits(data_config)
        report["requests"] = splits.stats
        report["split_shares"] = split_shares(splits.stats)
        report["schema"] = dataclasses.asdict(splits.schema)
    return report


def split_shares(stats: dict[str, Any]) -> dict[str, float]:
    """Share of the kept requests in each split. Under ``global_time`` the cuts are quantiles of every request
    *before* the per-user cap, so these are not ``split_quantiles`` (ml1m_base: about 76/12/12, not 80/10/10)."""
    counts = {name: int(stats.get(f"requests_{name}", 0)) for name in ("train", "valid", "test")}
    total = sum(counts.values())
    return {name: round(count / total, 4) if total else 0.0 for name, count in counts.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gesr_jax.data.commands", description=__doc__.splitlines()[0])
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
