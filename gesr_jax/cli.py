"""The ``gesr`` command line: ``train``, ``eval`` and ``data``.

::

    gesr train --config synthetic_tiny --workdir /tmp/run [--set train.num_steps=200 ...]
    gesr train --workdir /tmp/run                 # resume with the workdir's config.json
    gesr eval  --workdir /tmp/run                 # restore the latest checkpoint, print valid+test metrics
    gesr data  download ml-1m --to DIR | gesr data inspect --path DIR
    gesr config list | gesr config show synthetic_tiny [--set model.use_hma=false]

Usage errors (:func:`usage_errors`: a bad config, workdir, data file or checkpoint) print one
``error: ...`` line and exit with status 2; a run that diverges (NaN/Inf loss) prints one line and exits
with status 1, its last good checkpoint kept. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

from gesr_jax.config import ConfigError

EXIT_DIVERGED = 1  # training stopped on a NaN/Inf loss
EXIT_USAGE = 2  # bad config, arguments or data


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field by dotted path, e.g. --set train.learning_rate=3e-4 (repeatable)",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gesr", description="GESR (Generative Early Stage Ranking) in JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a config in a workdir (resumes when the workdir has checkpoints)")
    p.add_argument("--config", help="preset name (e.g. synthetic_tiny, ml1m_base_two_tower) or a .py file; "
                   "defaults to the workdir's config.json when resuming")  # fmt: skip
    p.add_argument("--workdir", required=True, help="run folder: config.json, metrics.jsonl, checkpoints/, plots/")
    _add_overrides(p)
    p.add_argument("--strict", action="store_true",
                   help="a corrupt checkpoint is an error (default: fall back to the newest intact one, warning)")
    p.add_argument("--allow-data-change", action="store_true",
                   help="resume even though the data differ from the workdir's data_fingerprint.json")
    p.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                   help="multi-process run: process 0's address (or $JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=int, default=None, help="multi-process run: processes (or $JAX_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, default=None, help="multi-process run: this process (or $JAX_PROCESS_ID)")
    _add_cache_flag(p)
    p.set_defaults(func=_run_train)

    p = sub.add_parser("eval", help="evaluate the best valid checkpoint of a workdir on valid and test")
    p.add_argument("--workdir", required=True, help="a folder written by `gesr train`")
    p.add_argument("--step", default=None, help="checkpoint step, or 'last' for the newest (default: the best valid step)")
    p.add_argument("--splits", default="valid,test", help="comma-separated splits to evaluate (default: valid,test)")
    p.add_argument("--strict", action="store_true", help="a corrupt checkpoint is an error (default: fall back, warning)")
    _add_cache_flag(p)
    p.set_defaults(func=_run_eval)

    p = sub.add_parser("data", help="download or inspect datasets")
    try:
        from gesr_jax.data import commands
    except ImportError as err:
        # The CLI keeps working for train/eval when the data commands cannot be imported.
        p.set_defaults(func=_data_unavailable, import_error=str(err))
    else:
        commands.register(p.add_subparsers(dest="data_command", required=True))

    from gesr_jax.serving.export import register_cli as register_export  # `gesr export`: serving artifacts

    register_export(sub)
    from gesr_jax import config_commands  # `gesr config list|show`

    config_commands.register(sub)
    return parser


def _add_cache_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-compilation-cache", action="store_true",
        help="do not use JAX's persistent compilation cache ($GESR_CACHE_DIR/jax_compilation_cache; "
             "also off with GESR_NO_COMPILATION_CACHE=1)",
    )  # fmt: skip


def _compilation_cache(args: argparse.Namespace) -> None:
    from gesr_jax.train import runtime

    runtime.enable_compilation_cache(False if args.no_compilation_cache else None)


def _data_unavailable(args: argparse.Namespace) -> int:
    print(f"error: `gesr data` is unavailable: gesr_jax.data.commands failed to import ({args.import_error})",
          file=sys.stderr)  # fmt: skip
    return EXIT_USAGE


def _run_train(args: argparse.Namespace) -> int:
    from gesr_jax import config as config_lib
    from gesr_jax.train import distributed

    # Before anything touches a JAX backend; only when one of the three settings is given.
    distributed.initialize(distributed.settings(args.coordinator_address, args.num_processes, args.process_id))
    _compilation_cache(args)
    from gesr_jax.train import trainer

    workdir = pathlib.Path(args.workdir)
    if args.config is not None:
        config = config_lib.load_config(args.config, args.overrides)
    elif (workdir / "config.json").exists():
        config = config_lib.apply_overrides(config_lib.load_json(workdir / "config.json"), args.overrides)
    else:
        raise ConfigError(f"--config is required: {workdir} has no config.json to resume from")
    flags = {"strict": args.strict, "allow_data_change": args.allow_data_change}
    results = trainer.train_and_evaluate(config, workdir, **{k: v for k, v in flags.items() if v})
    if distributed.is_primary():
        print(json.dumps(trainer.jsonable(results), sort_keys=True))
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    _compilation_cache(args)
    from gesr_jax.train import trainer

    names = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    unknown = sorted(set(names) - {"train", "valid", "test"})
    if unknown or not names:
        raise ConfigError(f"--splits must name train, valid and/or test, got {args.splits!r}")
    step = args.step if args.step in (None, "last") else _step_number(args.step)
    from gesr_jax.train import workdir as workdir_lib

    try:
        if pathlib.Path(args.workdir).is_dir():  # a missing workdir is reported below (no config.json)
            workdir_lib.check_writable(args.workdir)
    except workdir_lib.WorkdirNotWritableError as err:  # evaluate anyway; the results are printed
        print(f"warning: {err}; the results will be printed but eval.json cannot be written", file=sys.stderr)
    results = trainer.evaluate_workdir(args.workdir, step=step, split_names=names, strict=args.strict, write=False)
    print(json.dumps(trainer.jsonable(results), sort_keys=True), flush=True)
    trainer.write_eval_results(args.workdir, results)  # WorkdirNotWritableError: one line, status 2
    return 0


def _step_number(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"--step must be a checkpoint step number or 'last', got {raw!r}") from None


def usage_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean "the user asked for something that cannot work", not a bug."""
    from gesr_jax.data.datasets import DataError
    from gesr_jax.data.movielens import DataFormatError
    from gesr_jax.train import checkpoint

    errors: list[type[BaseException]] = [ConfigError, DataError, DataFormatError]
    checkpoint_error = getattr(checkpoint, "CheckpointError", None)  # a bad or mismatched checkpoint
    if checkpoint_error is not None:
        errors.append(checkpoint_error)
    try:
        from gesr_jax.models.registry import UnknownModelKindError
    except ImportError:
        pass
    else:
        errors.append(UnknownModelKindError)
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gesr`` console script; returns the process exit status."""
    args: Any = build_parser().parse_args(argv)
    from gesr_jax.train.trainer import TrainingDivergedError

    try:
        return int(args.func(args))
    except TrainingDivergedError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    except usage_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted; the workdir resumes from its latest checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
