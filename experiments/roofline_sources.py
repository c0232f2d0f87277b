"""Where a compiled step's traffic and time come from, by the source file of each HLO op (bench_roofline.py).

XLA keeps each op's Python stack in the compiled HLO text (the FileNames / FunctionNames / FileLocations /
StackFrames tables and each op's ``stack_frame_id``). :func:`bytes_by_source` splits the operand and result
bytes of the entry computation's ops by the first ``SOURCES`` file in that stack; :func:`time_by_source` splits
the measured time of every executed op (``jax.profiler`` trace: the CPU runtime records one event per op,
loop bodies included) the same way.
"""

from __future__ import annotations

import collections
import gzip
import json
import pathlib
import re
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

ATTENTION_SOURCE = "HSTU attention (kernels/)"
# Source files of the GESR train step's HLO ops, in the order they are matched against an op's stack frames.
SOURCES = (
    ("kernels/", ATTENTION_SOURCE),
    ("layers/core.py:dropout", "dropout masks (layers/core.py)"),
    ("layers/cross_attention.py", "RO/NRO cross attention (layers/cross_attention.py)"),
    ("layers/hstu.py", "HSTU layers: projections, LayerNorms, residuals (layers/hstu.py, sequence.py)"),
    ("layers/sequence.py", "HSTU layers: projections, LayerNorms, residuals (layers/hstu.py, sequence.py)"),
    ("layers/mlpg.py", "MLPG (layers/mlpg.py)"),
    ("layers/hard_matching.py", "HMA (layers/hard_matching.py)"),
    ("models/gesr/tokens.py", "MoA tokens (models/gesr/tokens.py)"),
    ("models/two_tower/", "towers and interaction (models/two_tower/)"),
    ("optax", "AdamW update and loss (optax, train/step.py)"),
    ("train/step.py", "AdamW update and loss (optax, train/step.py)"),
)
_DTYPE_BYTES = {"f32": 4, "s32": 4, "u32": 4, "pred": 1, "f16": 2, "bf16": 2, "s8": 1, "u8": 1, "s64": 8, "u64": 8,
                "f64": 8}  # fmt: skip


def _shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", text):
        total += _DTYPE_BYTES.get(dtype, 0) * int(np.prod([int(d) for d in dims.split(",") if d]))
    return total


def _op_sources(hlo: str) -> dict[str, str] | None:
    """{op name: ``SOURCES`` label or "other"} for every op of every computation; None without stack frames.

    Parents are printed one above their index (frame i's parent is ``parent_frame_id - 1``, 0 = none).
    """
    tables: dict[str, dict[int, str]] = collections.defaultdict(dict)
    section = None
    for line in hlo.splitlines():
        text = line.strip()
        if text in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = text
        elif section and re.match(r"\d+ ", text):
            index, value = text.split(" ", 1)
            tables[section][int(index)] = value
        elif section and text:
            section = None
    if not tables["StackFrames"] or "ENTRY" not in hlo:
        return None
    files = {i: v.strip('"') for i, v in tables["FileNames"].items()}
    functions = {i: v.strip('"') for i, v in tables["FunctionNames"].items()}
    loc_file = {}  # location -> "path:function"
    for i, v in tables["FileLocations"].items():
        ids = dict(re.findall(r"(\w+)=(\d+)", v))
        loc_file[i] = f"{files[int(ids['file_name_id'])]}:{functions[int(ids['function_name_id'])]}"
    frames = {i: tuple(int(x) for x in re.findall(r"=(\d+)", v)[:2]) for i, v in tables["StackFrames"].items()}

    def source(frame: int) -> str:
        stack, seen = [], set()
        while frame in frames and frame not in seen:
            seen.add(frame)
            location, parent = frames[frame]
            stack.append(loc_file.get(location, ""))
            frame = parent - 1
        joined = " | ".join(stack)
        return next((label for key, label in SOURCES if key in joined), "other")

    out = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = ([^\n]*)$", hlo, re.M):
        frame = re.search(r"stack_frame_id=(\d+)", m.group(2))
        out[m.group(1)] = source(int(frame.group(1))) if frame else "other"
    return out


def bytes_by_source(hlo: str) -> dict[str, float]:
    """Operand + result bytes of every op of the entry computation, by the first ``SOURCES`` file in its stack.

    Returns {} when the text has no stack frames (another jax version).
    """
    sources = _op_sources(hlo)
    if sources is None:
        return {}
    entry = hlo[hlo.index("ENTRY") :]
    sizes: dict[str, int] = {}
    out: collections.Counter[str] = collections.Counter()
    for line in entry.splitlines()[1:]:
        if line.startswith("}"):
            break
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([\w\-]+)\((.*?)\)(?:, |$)", line)
        if not m:
            continue
        name, shape, op, operands = m.groups()
        sizes[name] = _shape_bytes(shape)
        if op in ("parameter", "constant", "get-tuple-element", "tuple", "bitcast"):
            continue
        moved = sizes[name] + sum(sizes.get(o, 0) for o in re.findall(r"%([\w.\-]+)", operands))
        out[sources.get(name, "other")] += moved
    return dict(out)


def time_by_source(hlo: str, call: Callable[[], Any], calls: int = 5) -> dict[str, float]:
    """Milliseconds per call of every executed HLO op of ``call`` (the compiled program of ``hlo``), by source.

    Runs ``call`` under ``jax.profiler`` and sums the trace's per-op events whose names are ops of ``hlo``
    (while and conditional ops are left out: their bodies' ops have events of their own). {} when the text has
    no stack frames or the trace has no op events (another jax version or platform).
    """
    sources = _op_sources(hlo)
    if sources is None:
        return {}
    jax.block_until_ready(call())
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        try:
            for _ in range(calls):
                jax.block_until_ready(call())
        finally:
            jax.profiler.stop_trace()
        traces = sorted(pathlib.Path(trace_dir).rglob("*.trace.json.gz"))
        events = json.load(gzip.open(traces[-1]))["traceEvents"] if traces else []
    loops = {name for name in sources if re.match(r"(while|conditional)(\.\d+)?$", name)}
    out: collections.Counter[str] = collections.Counter()
    for event in events:
        name = event.get("name", "")
        if event.get("ph") == "X" and name in sources and name not in loops:
            out[sources[name]] += event["dur"] / 1e3 / calls  # microseconds -> ms per call
    return dict(out)
