"""The ``gesr`` command line: ``train``, ``eval``, ``export``, ``data`` and ``config``.

::

    gesr train --config synthetic_tiny --workdir /tmp/run [--set train.num_steps=200 ...]
    gesr train --workdir /tmp/run                 # resume with the workdir's config.json
    gesr eval  --workdir /tmp/run                 # the best valid step's metrics on valid and test
    gesr data  download ml-1m --to DIR | gesr data inspect --path DIR
    gesr config list | gesr config show synthetic_tiny [--set model.hma.enabled=false]
    gesr --debug train ...                        # any failure with its full traceback

Every failure ends in one ``error: ...`` line on stderr and an exit status by class (``EXIT_STATUS``,
also in ``gesr --help`` and docs/failures.md): 1 a run diverged (NaN/Inf; the newest usable checkpoint
is kept), 2 a usage error (a bad config, argument, workdir, data file or checkpoint), 3 an I/O failure
(disk full, read-only, no permission, I/O error: the line names the path and the operation), 130
interrupted. Anything else is a bug and keeps its traceback; ``--debug`` prints the traceback of every
failure.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import pathlib
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from gesr_jax import config as config_lib
from gesr_jax import config_commands, host_memory
from gesr_jax.config import ConfigError
from gesr_jax.data import commands as data_commands
from gesr_jax.data.datasets import DataError
from gesr_jax.data.movielens_lines import DataFormatError
from gesr_jax.models.registry import UnknownModelKindError
from gesr_jax.serving import export
from gesr_jax.train import distributed, launch, runtime, trainer
from gesr_jax.train.checkpoint_errors import CheckpointError
from gesr_jax.train.hooks import TrainingDivergedError, jsonable
from gesr_jax.workdir import parse_step
from gesr_jax.workdir_files import RunIOError, WorkdirNotWritableError, check_writable, describe_os_error

EXIT_DIVERGED = 1  # training stopped on NaN/Inf; the newest usable checkpoint is kept
EXIT_USAGE = 2  # bad config, arguments, workdir, data or checkpoint
EXIT_IO = 3  # a file or folder could not be written or read (ENOSPC, EROFS, EACCES, EIO, ...)
EXIT_INTERRUPTED = 130
EXIT_STATUS = {
    0: "success",
    EXIT_DIVERGED: "training diverged (NaN/Inf); the newest usable checkpoint is kept",
    EXIT_USAGE: "usage error: a bad config, argument, workdir, data file or checkpoint",
    EXIT_IO: "I/O failure (disk full, read-only, no permission, I/O error); the line names the path",
    distributed.EXIT_PEER_LOST: "a process of a multi-process run was lost; the others stopped (resume to go on)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); a workdir resumes from its latest checkpoint",
}
# OS errors that mean "the machine cannot store or read this" rather than a bug: one line, EXIT_IO.
IO_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO})
# "The user asked for something that cannot work", not a bug: one line, EXIT_USAGE.
USAGE_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, DataError, DataFormatError, CheckpointError, UnknownModelKindError,
)  # fmt: skip


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field by dotted path, e.g. --set train.learning_rate=3e-4 (repeatable)",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    epilog = "exit status: " + "; ".join(f"{code} = {what}" for code, what in EXIT_STATUS.items())
    parser = argparse.ArgumentParser(prog="gesr", description="GESR (Generative Early Stage Ranking) in JAX",
                                     epilog=epilog)  # fmt: skip
    parser.add_argument("--debug", action="store_true", help="print the full traceback of any failure")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a config in a workdir (resumes when the workdir has checkpoints)",
                       epilog=epilog)  # fmt: skip
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
    p.add_argument("--devices-per-process", type=int, default=None, metavar="K",
                   help="with --num-processes and no --process-id: start the processes here, K host CPU devices "
                        "each (a lost process stops the others: exit 4)")  # fmt: skip
    _add_cache_flag(p)
    p.set_defaults(func=_run_train)

    p = sub.add_parser("eval", help="evaluate the best valid checkpoint of a workdir on valid and test", epilog=epilog)
    p.add_argument("--workdir", required=True, help="a folder written by `gesr train`")
    p.add_argument("--step", default=None, help="checkpoint step, or 'last' for the newest (default: the best valid step)")
    p.add_argument("--splits", default="valid,test", help="comma-separated splits to evaluate (default: valid,test)")
    p.add_argument("--strict", action="store_true", help="a corrupt checkpoint is an error (default: fall back, warning)")
    _add_cache_flag(p)
    p.set_defaults(func=_run_eval)

    p = sub.add_parser("data", help="download or inspect datasets", epilog=epilog)
    data_commands.register(p.add_subparsers(dest="data_command", required=True))
    export.register_cli(sub)  # `gesr export`: serving artifacts
    config_commands.register(sub)  # `gesr config list|show`
    return parser


def _add_cache_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-compilation-cache", action="store_true",
        help="do not use JAX's persistent compilation cache ($GESR_CACHE_DIR/jax_compilation_cache; "
             "also off with GESR_NO_COMPILATION_CACHE=1)",
    )  # fmt: skip


def _compilation_cache(args: argparse.Namespace) -> None:
    runtime.enable_compilation_cache(False if args.no_compilation_cache else None)


def _run_train(args: argparse.Namespace) -> int:
    if launch.requested(args.num_processes, args.process_id, args.coordinator_address):
        return launch.launch_local(args.argv, args.num_processes, args.devices_per_process)
    # Before anything touches a JAX backend; only when one of the three settings is given.
    distributed.initialize(distributed.settings(args.coordinator_address, args.num_processes, args.process_id))
    _compilation_cache(args)
    workdir = pathlib.Path(args.workdir)
    if args.config is not None:
        config = config_lib.load_config(args.config, args.overrides)
    elif (workdir / "config.json").exists():
        config = config_lib.apply_overrides(config_lib.load_json(workdir / "config.json"), args.overrides)
    else:
        raise ConfigError(f"--config is required: {workdir} has no config.json to resume from")
    flags = {"strict": args.strict, "allow_data_change": args.allow_data_change}
    with distributed.peer_loss_explains_failures():  # a collective failing for a lost peer: the watchdog's line
        results = trainer.train_and_evaluate(config, workdir, **{k: v for k, v in flags.items() if v})
    if distributed.is_primary():
        print(json.dumps(jsonable(results), sort_keys=True))
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    _compilation_cache(args)
    names = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    unknown = sorted(set(names) - {"train", "valid", "test"})
    if unknown or not names:
        raise ConfigError(f"--splits must name train, valid and/or test, got {args.splits!r}")
    step = args.step if args.step in (None, "last") else parse_step(args.step)
    try:
        if pathlib.Path(args.workdir).is_dir():  # a missing workdir is reported below (no config.json)
            check_writable(args.workdir)
    except WorkdirNotWritableError as err:  # evaluate anyway; the results are printed
        print(f"warning: {err}; the results will be printed but eval.json cannot be written", file=sys.stderr)
    results = trainer.evaluate_workdir(args.workdir, step=step, split_names=names, strict=args.strict, write=False)
    print(json.dumps(jsonable(results), sort_keys=True), flush=True)
    trainer.write_eval_results(args.workdir, results)  # WorkdirNotWritableError: one line, EXIT_IO
    return 0


def io_message(err: OSError, folder: str | None = None) -> str:
    """One line for an I/O failure: a :class:`RunIOError` names its operation and path itself; an OS error
    without a file name (a write to an open file, a background writer) names the command's ``folder``."""
    if isinstance(err, RunIOError):
        return str(err)
    where = f": {err.filename}" if err.filename else (f" under {folder}" if folder else "")
    return f"I/O failure{where}: {describe_os_error(err)}"


def _fail(message: str, status: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    print(f"error: {message}", file=sys.stderr, flush=True)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gesr`` console script; returns the process exit status (``EXIT_STATUS``)."""
    args: Any = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the local launcher re-runs this command
    ours = logging.getLogger("gesr_jax")
    level = ours.level  # restored on return: a notebook or test calling main() keeps its own logging
    if args.debug:
        ours.setLevel(logging.DEBUG)  # also keeps Orbax's logged tracebacks
    try:
        return _run(args)
    finally:
        ours.setLevel(level)


def _host_allocator() -> None:
    """Before any command touches JAX's backend: XLA's per-call buffers then reuse freed host memory."""
    try:
        host_memory.configure_from_env()
    except ValueError as err:  # a bad $GESR_HOST_ALLOCATOR: one usage line
        raise ConfigError(str(err)) from None


def _run(args: Any) -> int:
    try:
        _host_allocator()
        return int(args.func(args))
    except TrainingDivergedError as err:
        return _fail(str(err), EXIT_DIVERGED, args.debug)
    except USAGE_ERRORS as err:
        return _fail(str(err), EXIT_USAGE, args.debug)
    except OSError as err:
        if not (isinstance(err, RunIOError) or err.errno in IO_ERRNOS):
            raise  # e.g. a FileNotFoundError from a bug: keep the traceback
        return _fail(io_message(err, getattr(args, "workdir", None)), EXIT_IO, args.debug)
    except KeyboardInterrupt:
        print("interrupted; the workdir resumes from its latest checkpoint", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
