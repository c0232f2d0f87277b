"""The data fingerprint a workdir stores at its first start, so that a resume on other data is caught.

``data_fingerprint`` hashes every array of every split (name, dtype, shape, bytes) in a fixed order;
``gesr_jax.workdir_files.check_data_fingerprint`` compares two of them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from gesr_jax.data.event_log import SPLIT_NAMES, RequestSplit


def _split_arrays(splits: Any) -> dict[str, Mapping[str, np.ndarray]]:
    if isinstance(splits, Mapping):
        return {name: splits[name] for name in SPLIT_NAMES if name in splits}
    return {name: getattr(splits, name) for name in SPLIT_NAMES if getattr(splits, name, None) is not None}


_FINGERPRINT_ROWS = 65536  # rows of a by-reference split hashed at a time


def data_fingerprint(splits: Any) -> dict[str, dict[str, Any]]:
    """``{split: {"requests", "arrays", "sha256"}}`` for a Splits-like object or a ``{split: arrays}`` mapping.

    ``requests`` is the leading dimension, ``arrays`` the sorted array names and ``sha256`` a hash of
    every array's name, dtype, shape and bytes in sorted name order. JSON-serialisable; cost is one
    pass of sha256 over the arrays (no copies for contiguous arrays).
    """
    out: dict[str, dict[str, Any]] = {}
    for name, arrays in _split_arrays(splits).items():
        sha = hashlib.sha256()
        requests = 0
        for key in sorted(arrays):
            if isinstance(arrays, RequestSplit):
                # A split by reference is hashed in row chunks: the same bytes in the same order as its
                # materialised arrays (same digest), without ever holding a whole [requests, N] column.
                requests = arrays.num_requests
                first = arrays.gather(slice(0, 1), keys=(key,))[key]
                sha.update(f"{key}|{first.dtype.str}|{(requests, *first.shape[1:])}|".encode())
                for lo in range(0, requests, _FINGERPRINT_ROWS):
                    chunk = arrays.gather(slice(lo, lo + _FINGERPRINT_ROWS), keys=(key,))[key]
                    sha.update(np.ascontiguousarray(chunk).reshape(-1).view(np.uint8))
                continue
            arr = np.ascontiguousarray(arrays[key])
            requests = int(arr.shape[0]) if arr.ndim else requests
            sha.update(f"{key}|{arr.dtype.str}|{arr.shape}|".encode())
            sha.update(arr.reshape(-1).view(np.uint8))  # the bytes in place, any dtype, 0-d included
        out[name] = {"requests": requests, "arrays": sorted(arrays), "sha256": sha.hexdigest()}
    return out
