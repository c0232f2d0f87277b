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


def write(path: str | pathlib.Path, rows: list[dict[str, Any]], max_bytes: int = MAX_SIDECAR_BYTES) -> pathlib.Path:
    """Write ``{"version", "rows"}`` to ``path``, without the per-test-user sums if they exceed ``max_bytes``."""
    text = _dumps({"version": SIDECAR_VERSION, "rows": rows})
    if len(text.encode()) > max_bytes:
        size = len(text.encode())
        drop = lambda runs: [{k: v for k, v in r.items() if k != "test_users"} for r in runs]  # noqa: E731
        rows = [{**row, "runs": drop(row["runs"])} for row in rows]
        reason = f"per-test-user sums (test_users): the file would be {size / 1e6:.1f} MB, over {max_bytes / 1e6:g} MB"
        text = _dumps({"version": SIDECAR_VERSION, "left_out": reason, "rows": rows})
    pathlib.Path(path).write_text(text + "\n")
    return pathlib.Path(path)
