"""Every backend's declaration; `api.py`, the benchmarks and the docs select from here.

Adding a backend: a module or package under `backends/` that ends with one `BACKEND = Backend(...)` (see
`base.py`), and one line in `_BACKEND_MODULES` below.
"""

from __future__ import annotations

import importlib

import jax

from kernels.hstu_attention.base import Backend, Request
from kernels.hstu_attention.config import BlockSizes

# One line per backend: the module that declares `BACKEND`. Order only breaks priority ties.
_BACKEND_MODULES = (
    "kernels.hstu_attention.backends.xla.dense",
    "kernels.hstu_attention.backends.xla.blocked",
    "kernels.hstu_attention.backends.triton",
    "kernels.hstu_attention.backends.mosaic_gpu",
    "kernels.hstu_attention.backends.tpu",
)

BACKENDS: dict[str, Backend] = {
    b.name: b for b in (importlib.import_module(module).BACKEND for module in _BACKEND_MODULES)
}
IMPLEMENTATIONS = tuple(BACKENDS)


def auto_candidates(request: Request, platform: str | None = None, device=None) -> list[Backend]:
    """Backends implementation=None tries for `request`, best first, ending with "xla" (the last resort).

    Backends that declare the request unsupported are left out silently; only a backend that was expected to
    run and raised NotImplementedError warns (see api.py).
    """
    platform = platform or jax.default_backend()
    platform = "gpu" if platform == "cuda" else platform
    device = device if device is not None else jax.devices()[0]
    ranked = sorted(BACKENDS.values(), key=lambda b: -b.priority)
    chosen = [b for b in ranked if b.name != "xla" and b.runs_on(platform, device) and b.unsupported_reason(request) is None]
    return chosen + [BACKENDS["xla"]]


def default_block_sizes(implementation: str, seq_len: int) -> BlockSizes:
    """The default tiles of `implementation` (from its declaration), shrunk to fit `seq_len`."""
    backend = BACKENDS.get(implementation)
    if backend is None or backend.default_blocks is None:
        known = sorted(name for name, b in BACKENDS.items() if b.default_blocks is not None)
        raise ValueError(f"no block sizes for implementation {implementation!r}; known: {known}")
    return backend.default_block_sizes(seq_len)


def capability_table() -> str:
    """What each backend declares, as a markdown table (docs/kernels.md embeds it; a test keeps them equal)."""
    lines = ["| backend | platforms | score | biases | modes | dtypes |", "| --- | --- | --- | --- | --- | --- |"]
    for b in BACKENDS.values():
        biases = ", ".join(sorted(b.biases)) or "none"
        device = " (Hopper)" if b.device_ok is not None else ""
        lines.append(f"| `{b.name}` | {', '.join(b.platforms)}{device} | {', '.join(b.score_fns)} | {biases} "
                     f"| {', '.join(b.modes)} | {', '.join(b.dtypes)} |")
    return "\n".join(lines) + "\n"
