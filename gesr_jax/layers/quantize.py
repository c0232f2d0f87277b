"""Post-training FP8 weight quantisation of large Dense kernels (GESR's serving optimisation, spec §1.12).

Each selected kernel W [in, out] is stored as ``float8_e4m3fn`` values ``Q`` with a float32
per-output-column scale ``s = max_i |W[i, o]| / 448`` (448 = the format's largest finite
value), and :class:`~gesr_jax.layers.core.Dense` computes with ``Q * s``. Weight-only: it
quarters kernel memory and bandwidth; activations and embedding tables are untouched. No
retraining, as in the paper; ``api.quantize_fp8`` is the entry point.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from gesr_jax.layers.core import Dense

FP8 = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8).max)


def quantize_fp8(model: nnx.Module, *, min_elements: int = 4096) -> int:
    """Quantise, in place, every Dense kernel of ``model`` with at least ``min_elements`` entries.

    Returns how many kernels were quantised. Kernels already quantised are left alone.
    """
    if min_elements < 1:
        raise ValueError(f"quantize_fp8: min_elements must be >= 1, got {min_elements}")
    targets = [
        node
        for _, node in nnx.iter_graph(model)
        if isinstance(node, Dense) and node.kernel_scale is None and node.kernel[...].size >= min_elements
    ]
    for dense in targets:
        w = dense.kernel[...].astype(jnp.float32)
        amax = jnp.max(jnp.abs(w), axis=0)
        scale = jnp.where(amax > 0, amax / FP8_MAX, 1.0)
        # Clip before the cast: e4m3fn has no infinity and overflows to NaN.
        q = jnp.clip(w / scale, -FP8_MAX, FP8_MAX).astype(FP8)
        names = dense.kernel.get_metadata().get("out_sharding", (None, None))
        dense.kernel = nnx.Param(q, out_sharding=names, eager_sharding=False)
        dense.kernel_scale = nnx.data(nnx.Param(scale, out_sharding=(names[1],), eager_sharding=False))
    return len(targets)
