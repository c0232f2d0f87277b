"""Bytes of one ``jax.export.Exported``: its official serialization, or a self-contained fallback container.

``jax.export``'s own ``serialize``/``deserialize`` need the optional ``flatbuffers`` package, which is not in
this project's pinned set. When it is importable, those are used. Otherwise an Exported is written as::

    b"GESRXP1\\n" | 8-byte little-endian header length | JSON header | StableHLO portable artifact

where the header holds everything ``jax.export.Exported`` needs besides the module (name, input/output
pytrees and avals, platforms, calling convention, kept variables). The module bytes are exactly
``Exported.mlir_module_serialized`` (StableHLO's versioned portable artifact), so the container is as
forward-compatible as jax's own format for what serving exports: static shapes, no shardings, no effects.
:func:`deserialize` reads both formats. Only jax and numpy are imported.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import jax
import numpy as np
from jax import tree_util

MAGIC = b"GESRXP1\n"


def _flatbuffers_available() -> bool:
    try:
        import flatbuffers  # noqa: F401
    except ImportError:
        return False
    return True


def _tree_to_json(tree: tree_util.PyTreeDef) -> Any:
    if tree_util.treedef_is_leaf(tree) and tree.num_leaves == 1:
        return {"k": "leaf"}
    node_type, aux = tree.node_data()
    children = [_tree_to_json(c) for c in tree.children()]
    if node_type is type(None):
        return {"k": "none"}
    if node_type is tuple:
        return {"k": "tuple", "c": children}
    if node_type is list:
        return {"k": "list", "c": children}
    if node_type is dict:
        return {"k": "dict", "keys": list(aux), "c": children}
    raise ValueError(f"cannot store pytree node {node_type.__name__}: serving exports take lists, tuples and dicts")


def _tree_from_json(data: Any) -> Any:
    """An example pytree (leaves 0) of the stored structure."""
    kind = data["k"]
    if kind == "leaf":
        return 0
    if kind == "none":
        return None
    children = [_tree_from_json(c) for c in data["c"]]
    if kind == "tuple":
        return tuple(children)
    if kind == "list":
        return children
    return dict(zip(data["keys"], children, strict=True))


def _avals(avals: Any) -> list[dict[str, Any]]:
    return [{"shape": [int(d) for d in a.shape], "dtype": str(np.dtype(a.dtype))} for a in avals]


def serialize(exported: jax.export.Exported, *, fallback: bool | None = None) -> bytes:
    """Bytes of ``exported``; ``fallback=None`` picks jax's format when flatbuffers is importable."""
    if fallback is None:
        fallback = not _flatbuffers_available()
    if not fallback:
        return bytes(exported.serialize())
    if exported.ordered_effects or exported.unordered_effects or exported.disabled_safety_checks:
        raise ValueError("the fallback container stores no effects or disabled safety checks")
    if any(s is not None for s in (*exported.in_shardings_hlo, *exported.out_shardings_hlo)):
        raise ValueError("the fallback container stores no shardings")
    header = {
        "fun_name": exported.fun_name,
        "in_tree": _tree_to_json(exported.in_tree),
        "in_avals": _avals(exported.in_avals),
        "out_tree": _tree_to_json(exported.out_tree),
        "out_avals": _avals(exported.out_avals),
        "nr_devices": exported.nr_devices,
        "platforms": list(exported.platforms),
        "calling_convention_version": exported.calling_convention_version,
        "module_kept_var_idx": list(exported.module_kept_var_idx),
        "uses_global_constants": bool(exported.uses_global_constants),
    }
    raw = json.dumps(header, sort_keys=True).encode()
    return MAGIC + struct.pack("<Q", len(raw)) + raw + bytes(exported.mlir_module_serialized)


def deserialize(data: bytes) -> jax.export.Exported:
    """The Exported of :func:`serialize`'s bytes (either format)."""
    if not data.startswith(MAGIC):
        return jax.export.deserialize(bytearray(data))
    (size,) = struct.unpack("<Q", data[len(MAGIC) : len(MAGIC) + 8])
    start = len(MAGIC) + 8
    header = json.loads(data[start : start + size])
    module = bytes(data[start + size :])
    in_avals = tuple(jax.core.ShapedArray(tuple(a["shape"]), np.dtype(jax.numpy.dtype(a["dtype"])))
                     for a in header["in_avals"])  # fmt: skip
    out_avals = tuple(jax.core.ShapedArray(tuple(a["shape"]), np.dtype(jax.numpy.dtype(a["dtype"])))
                      for a in header["out_avals"])  # fmt: skip
    return jax.export.Exported(
        fun_name=header["fun_name"],
        in_tree=jax.tree.structure(_tree_from_json(header["in_tree"])),
        in_avals=in_avals,
        out_tree=jax.tree.structure(_tree_from_json(header["out_tree"])),
        out_avals=out_avals,
        _in_named_shardings=(None,) * len(in_avals),
        _out_named_shardings=(None,) * len(out_avals),
        in_shardings_hlo=(None,) * len(in_avals),
        out_shardings_hlo=(None,) * len(out_avals),
        nr_devices=header["nr_devices"],
        platforms=tuple(header["platforms"]),
        ordered_effects=(),
        unordered_effects=(),
        disabled_safety_checks=(),
        mlir_module_serialized=module,
        calling_convention_version=header["calling_convention_version"],
        module_kept_var_idx=tuple(header["module_kept_var_idx"]),
        uses_global_constants=header["uses_global_constants"],
        _get_vjp=None,
    )
