"""The files of a serving export: jax's own ``Exported`` bytes, sha256 checksums, and their errors.

Each ``*.jaxexp`` file holds ``jax.export.serialize(exported)`` (jax's flatbuffer format; ``flatbuffers`` is
a pinned dependency). The export's manifest records the sha256 of every file it wrote; :func:`read_verified`
reads a file once, checks its bytes against that digest, and hands the same bytes on, so what is verified is
what is deserialized. A mismatch, a missing file or bytes jax cannot deserialize raise :class:`ExportError`
naming the file.

Exports written before checksums (manifest version 1) may hold a home-made container,
``b"GESRXP1\\n" | 8-byte little-endian header length | JSON header | StableHLO module``, used when
flatbuffers was not installed. It is read (never written) by :func:`deserialize`, so such exports still load.
Only jax, numpy and the request errors are imported (the loader must not import model code).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import struct
from typing import Any

import jax
import numpy as np

from gesr_jax.serving.requests import RequestError

LEGACY_MAGIC = b"GESRXP1\n"


class ExportError(ValueError):
    """An export file is missing, damaged, or was written by an incompatible version; ``path`` names it."""

    def __init__(self, message: str, *, path: str | pathlib.Path | None = None):
        self.path = None if path is None else pathlib.Path(path)
        super().__init__(f"{path}: {message}" if path is not None else message)


class ArtifactUnavailable(RequestError):
    """A request could not be scored because an artifact its bucket needs is damaged (lazy verification).

    A :class:`RequestError` so it takes the request's slot in ``score``'s results; ``path`` names the file.
    """

    def __init__(self, message: str, *, path: pathlib.Path | None = None, index: int | None = None):
        self.path = path
        super().__init__(message, index=index)

    def with_index(self, index: int) -> ArtifactUnavailable:
        return ArtifactUnavailable(self.message, path=self.path, index=index)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_verified(path: pathlib.Path, expected: str | None) -> bytes:
    """The bytes of ``path`` after checking their sha256 against ``expected`` (``None``: unverified)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ExportError("is missing (the manifest lists it)", path=path) from None
    except OSError as err:
        raise ExportError(f"cannot be read ({err.strerror or err})", path=path) from None
    if expected is not None and sha256(data) != expected:
        raise ExportError(
            f"is damaged: sha256 {sha256(data)[:16]}... differs from the manifest's {expected[:16]}... "
            f"({len(data)} bytes); re-export it",
            path=path,
        )
    return data


def serialize(exported: jax.export.Exported) -> bytes:
    """jax's own serialization of ``exported``."""
    return bytes(exported.serialize())


def deserialize(data: bytes, *, path: pathlib.Path | None = None) -> jax.export.Exported:
    """The Exported of :func:`serialize`'s bytes (or of a legacy container); :class:`ExportError` naming ``path``."""
    try:
        if data.startswith(LEGACY_MAGIC):
            return _deserialize_legacy(data)
        return jax.export.deserialize(bytearray(data))
    except Exception as err:  # flatbuffer / StableHLO decoders raise many types; all mean "unreadable"
        raise ExportError(f"is not a readable jax.export artifact ({type(err).__name__}: {err})", path=path) from None


# ------------------------------------------------------------------------------------- legacy (read-only)


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


def _avals(records: list[dict[str, Any]]) -> tuple[jax.core.ShapedArray, ...]:
    return tuple(jax.core.ShapedArray(tuple(a["shape"]), np.dtype(jax.numpy.dtype(a["dtype"]))) for a in records)


def _deserialize_legacy(data: bytes) -> jax.export.Exported:
    (size,) = struct.unpack("<Q", data[len(LEGACY_MAGIC) : len(LEGACY_MAGIC) + 8])
    start = len(LEGACY_MAGIC) + 8
    header = json.loads(data[start : start + size])
    in_avals, out_avals = _avals(header["in_avals"]), _avals(header["out_avals"])
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
        mlir_module_serialized=bytes(data[start + size :]),
        calling_convention_version=header["calling_convention_version"],
        module_kept_var_idx=tuple(header["module_kept_var_idx"]),
        uses_global_constants=header["uses_global_constants"],
        _get_vjp=None,
    )
