"""Process-wide JAX settings of the command line: the persistent compilation cache and the device report.

The persistent cache keeps compiled XLA executables on disk, so a second ``gesr train`` of the same
config skips most of its compilation. It lives under the project's cache folder (``$GESR_CACHE_DIR`` or
``~/.cache/gesr_jax``, as for built datasets), in ``jax_compilation_cache/``. ``GESR_NO_COMPILATION_CACHE=1``
(or ``gesr train --no-compilation-cache``) turns it off; ``GESR_COMPILATION_CACHE_DIR`` moves it.
"""

from __future__ import annotations

import os
import pathlib

import jax

from gesr_jax.data import movielens_dataset

DISABLE_ENV = "GESR_NO_COMPILATION_CACHE"
DIR_ENV = "GESR_COMPILATION_CACHE_DIR"


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def compilation_cache_dir() -> pathlib.Path:
    """``$GESR_COMPILATION_CACHE_DIR``, else ``<cache dir>/jax_compilation_cache``."""
    explicit = os.environ.get(DIR_ENV)
    if explicit:
        return pathlib.Path(explicit)
    return movielens_dataset.cache_dir() / "jax_compilation_cache"  # the one definition of the cache folder


def enable_compilation_cache(enabled: bool | None = None) -> pathlib.Path | None:
    """Turn JAX's persistent compilation cache on (the folder) or leave it off (None).

    ``enabled=None`` means "on unless ``$GESR_NO_COMPILATION_CACHE`` is set". A folder that cannot be
    created leaves the cache off: a read-only home must not stop a run.
    """
    if enabled is None:
        enabled = not _truthy(os.environ.get(DISABLE_ENV))
    if not enabled:
        return None
    folder = compilation_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    # JAX only caches programs that took >= 1 s to compile by default; the small CPU runs this project
    # is used for compile many programs of a few hundred ms each, which together are most of a start.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder


def describe_devices() -> str:
    """One line: the backend and the devices a run uses, e.g. ``backend cpu: 1 device (TFRT_CPU_0)``."""
    devices = jax.devices()
    kinds = sorted({getattr(d, "device_kind", d.platform) for d in devices})
    shown = ", ".join(str(d) for d in devices[:4]) + (f", ... ({len(devices)} in all)" if len(devices) > 4 else "")
    processes = f", {jax.process_count()} processes" if jax.process_count() > 1 else ""
    plural = "s" if len(devices) != 1 else ""
    return f"backend {jax.default_backend()} ({'/'.join(kinds)}): {len(devices)} device{plural}{processes} [{shown}]"
