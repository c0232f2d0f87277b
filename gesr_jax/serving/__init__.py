"""Serving: encode a request once, score thousands of candidates in chunks, export it (issue 12).

* :class:`Scorer` (``scorer.py``): the live scorer of any registered model, from a workdir or from
  ``(graphdef, params, schema)``; request batches and candidate chunks of static bucket sizes
  (``buckets.py``), per-request errors (``requests.py``), user-state reuse (``user_cache.py``).
* :func:`export_workdir` / :func:`export_scorer` (``export.py``): ``jax.export`` artifacts + params +
  item table + manifest.json; :func:`load` (``loader.py``) serves them without the model's Python code.

Attributes are imported on first use, so ``gesr_jax.serving.load`` never imports ``gesr_jax.models``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Scorer": "scorer",
    "load_workdir": "scorer",
    "Buckets": "buckets",
    "UserStateCache": "user_cache",
    "CacheStats": "user_cache",
    "RequestError": "requests",
    "Engine": "engine",
    "export_workdir": "export",
    "export_scorer": "export",
    "register_cli": "export",
    "load": "loader",
    "ExportedScorer": "loader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"gesr_jax.serving.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'gesr_jax.serving' has no attribute {name!r}")
