"""Content checksums and finiteness checks of pytrees of arrays (what checkpoint integrity records).

* :func:`tree_digest` -- ``{key path: {"shape", "dtype", "sha256"}}`` of every leaf, from host copies;
* :func:`leaf_specs` -- ``{key path: (shape, dtype)}`` (arrays or shape/dtype structs);
* :func:`iterator_digest` -- sha256 of a grain iterator's JSON state;
* :func:`count_nonfinite` / :func:`all_finite` -- NaN/Inf over the floating-point leaves.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils


def _host(x: Any) -> np.ndarray:
    """A full host copy of one leaf; arrays spread over several hosts are gathered first."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def leaf_specs(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{key path: (shape, dtype)}`` of every leaf of ``tree`` (arrays or shape/dtype structs)."""
    return {
        jax.tree_util.keystr(path): (tuple(int(d) for d in leaf.shape), str(np.dtype(leaf.dtype)))
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def tree_digest(tree: Any) -> dict[str, dict[str, Any]]:
    """``{key path: {"shape", "dtype", "sha256"}}`` of every leaf, hashed from a host copy of its bytes."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        host = np.asarray(_host(leaf), order="C")  # not ascontiguousarray: it makes 0-d arrays 1-d
        out[jax.tree_util.keystr(path)] = {
            "shape": list(host.shape),
            "dtype": str(host.dtype),
            "sha256": hashlib.sha256(host.tobytes()).hexdigest(),
        }
    return out


def iterator_digest(data_iterator: grain.DatasetIterator) -> str:
    return hashlib.sha256(json.dumps(data_iterator.get_state(), sort_keys=True).encode()).hexdigest()


def count_nonfinite(tree: Any) -> int:
    """Number of NaN/Inf values over the floating-point leaves of ``tree`` (one scalar pulled to host)."""
    leaves = [leaf for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    return int(_count_nonfinite(leaves))


@jax.jit
def _count_nonfinite(leaves: list[jax.Array]) -> jax.Array:
    # One program for every leaf: with tables sharded across processes each per-leaf eager sum was its own
    # cross-process all-reduce, and the CPU runtime deadlocked on that stream of small collectives.
    return sum((jnp.sum(~jnp.isfinite(x)) for x in leaves), jnp.zeros((), jnp.int32))


def all_finite(tree: Any) -> bool:
    """True when every floating-point value of ``tree`` is finite (the trainer saves only such params)."""
    return count_nonfinite(tree) == 0
