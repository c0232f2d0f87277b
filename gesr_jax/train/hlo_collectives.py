"""The collectives of a compiled XLA program, read from its HLO text: kind, result arrays and group size.

Used by the sharded-table tests (the row layout's step must reduce-scatter its lookups and never all-reduce
them) and by ``experiments/bench_sharding.py`` (collective bytes per step). A collective over a group of
one device (e.g. an all-reduce over a ``data`` axis of size 1, which ``shard_map``'s transpose emits)
moves nothing and is reported with ``group_size == 1`` so callers can leave it out.
"""

from __future__ import annotations

import dataclasses
import math
import re

KINDS = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all")
DTYPE_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "u8": 1, "pred": 1, "f64": 8, "s64": 8,
               "u64": 8, "s16": 2, "u16": 2, "f8e4m3fn": 1, "f8e5m2": 1}  # fmt: skip
_OP = re.compile(r"= (?P<type>[^=\n]+?) (?P<kind>" + "|".join(KINDS) + r")(?:-start)?\((?P<rest>[^\n]*)")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[(?P<axes>[^\]]*)\] \{(?P<names>[^}]*)\}")
_LIST_GROUPS = re.compile(r"replica_groups=\{\{(?P<first>[^}]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[(?P<n>\d+),(?P<size>\d+)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str  # one of KINDS
    shapes: tuple[tuple[int, ...], ...]  # every array of its result (a tuple result has several)
    nbytes: int  # bytes of its result on one device
    group_size: int  # devices in one replica group (0 when the text does not say)


def _group_size(rest: str) -> int:
    m = _MESH_GROUPS.search(rest)
    if m:
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group("axes")))
        names = re.findall(r"'(\w+)'", m.group("names"))
        return math.prod(int(sizes[n]) for n in names if n in sizes)
    m = _LIST_GROUPS.search(rest)
    if m:
        return len([x for x in m.group("first").split(",") if x.strip()])
    m = _IOTA_GROUPS.search(rest)
    return int(m.group("size")) if m else 0


def collectives(hlo: str) -> list[Collective]:
    """Every collective of a compiled HLO module (``compiled.as_text()``), in program order."""
    hlo = re.sub(r"/\*index=\d+\*/", "", hlo)  # long tuple types number their parts
    out = []
    for m in _OP.finditer(hlo):
        arrays = _ARRAY.findall(m.group("type"))
        shapes = tuple(tuple(int(d) for d in dims.split(",") if d) for _, dims in arrays)
        nbytes = sum(DTYPE_BYTES.get(dt, 4) * math.prod(s) for (dt, _), s in zip(arrays, shapes, strict=True))
        out.append(Collective(m.group("kind"), shapes, nbytes, _group_size(m.group("rest"))))
    return out


def bytes_by_kind(hlo: str) -> dict[str, int]:
    """Result bytes per device of each kind of collective that moves data (groups of more than one device)."""
    out = dict.fromkeys(KINDS, 0)
    for c in collectives(hlo):
        if c.group_size != 1:
            out[c.kind] += c.nbytes
    return out
