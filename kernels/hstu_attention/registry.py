"""Every backend's declaration, best first per platform; `api.py` and the benchmark select from here."""

from __future__ import annotations

import jax

from kernels.hstu_attention import backend_pallas_mosaic_gpu, backend_pallas_tpu, backend_pallas_triton, backend_xla
from kernels.hstu_attention.base import Backend, Request

BACKENDS: dict[str, Backend] = {
    b.BACKEND.name: b.BACKEND
    for b in (backend_xla, backend_pallas_triton, backend_pallas_mosaic_gpu, backend_pallas_tpu)
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
