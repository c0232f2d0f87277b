"""The JSON form of a results table's per-seed sidecar (``experiments/results/*.json``).

``comparison.write_sidecar`` gathers the records (per row and seed: valid and test metrics, best step,
config hash, train time, and the per-test-user sums the user bootstrap needs); this module writes them.
Lists of numbers go on one line each: one number per line doubled the file. A sidecar stays committable
(``MAX_SIDECAR_BYTES``): when the per-test-user sums would push it past that (the synthetic test split has
about 64,000 users: 16 MB), they are left out and the file's ``"left_out"`` says so and why; the table's
bootstrap column then cannot be rebuilt from the sidecar, and every other column still can.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
from typing import Any

from gesr_jax import config as config_lib

SIDECAR_VERSION = 1
MAX_SIDECAR_BYTES = 1_000_000  # the largest file the repository keeps under experiments/results


def config_hash(config: Any) -> str:
    """sha256 (first 16 hex digits) of a config's canonical JSON: equal hashes, equal configs."""
    text = json.dumps(config_lib.to_dict(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _dumps(data: dict[str, Any]) -> str:
    text = json.dumps(data, indent=1, allow_nan=True)
    return re.sub(r"\[([^\[\]{}\"]*)\]", lambda m: "[" + ",".join(m.group(1).split()).replace(",,", ",") + "]", text)


def _without(value: Any, key: str) -> Any:
    """``value`` with every mapping entry named ``key`` removed, at any depth."""
    if isinstance(value, dict):
        return {k: _without(v, key) for k, v in value.items() if k != key}
    if isinstance(value, list):
        return [_without(v, key) for v in value]
    return value


def write_json(
    path: str | pathlib.Path, data: dict[str, Any], bulky: str, max_bytes: int = MAX_SIDECAR_BYTES
) -> pathlib.Path:
    """Write ``data`` to ``path``; past ``max_bytes``, without its ``bulky`` entries (at any depth), and the
    file's ``"left_out"`` says which and why."""
    text = _dumps(data)
    size = len(text.encode())
    if size > max_bytes:
        reason = f"{bulky} (the per-test-user sums): the file would be {size / 1e6:.1f} MB, over {max_bytes / 1e6:g} MB"
        text = _dumps({"left_out": reason, **_without(data, bulky)})
    pathlib.Path(path).write_text(text + "\n")
    return pathlib.Path(path)


def write(path: str | pathlib.Path, rows: list[dict[str, Any]], max_bytes: int = MAX_SIDECAR_BYTES) -> pathlib.Path:
    """A comparison sidecar ``{"version", "rows"}``; over ``max_bytes`` without the ``test_users`` sums."""
    return write_json(path, {"version": SIDECAR_VERSION, "rows": rows}, "test_users", max_bytes)
