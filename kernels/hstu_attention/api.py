"""Target-aware HSTU attention: the one attention entry point of gesr_jax.

What it computes
----------------
For q, k: [B, L, H, Dqk], v: [B, L, H, Dv], right-padded rows with `lengths[b]` valid tokens of which the last
`num_targets[b]` are candidates::

    out[b, i, h] = sum_j valid(b, i, j) * silu(alpha * q[b, i, h] . k[b, j, h]) / normalizer * v[b, j, h]

`alpha` defaults to 1/sqrt(Dqk). `normalizer` is a static positive number chosen by the model (HSTU divides by a
fixed maximum length, never by the padded L), so the result does not depend on how much padding a batch has.

The mask. With hist = lengths - num_targets and c(x) = min(x, hist), the pair (i, j) is valid iff i < lengths,
j < lengths and (i == j or c(i) > c(j)):
  * history tokens attend causally to history (diagonal included) and never to candidates;
  * each candidate attends to the whole history and to itself, never to another candidate, so scoring C
    candidates together equals scoring each alone (M-FALCON);
  * `contextual_len` = n > 0: every valid row also sees keys j < n, and rows i < n see every j < hist
    (contextual features such as user profile tokens are global);
  * `max_attn_len` = w: a non-contextual pair additionally needs c(i) - c(j) <= w (sliding window).
Rows i >= lengths[b] are exactly zero. Lengths are clipped to [0, L] and num_targets to [0, lengths]. Inputs
must be finite; padded positions may hold any finite values.

Backends (`implementation=`)
----------------------------
  * "xla": pure jnp (`reference.py`), materialises [B, H, L, L]; the CPU fallback and the test oracle.
  * "pallas_triton": Pallas lowered through Triton, any CUDA GPU; float32 / bfloat16 / float16.
  * "pallas_mosaic_gpu": Pallas Mosaic GPU for Hopper (sm_90): warp-specialised TMA producer, two wgmma
    consumer warpgroups; the non-deprecated GPU path; bfloat16 / float16 only. Its tiles live in shared
    memory (227 KiB per CTA): large head dims shrink the streamed tiles to 64 rows, and past
    Dqk + Dv = 448 (each padded to 64) it raises NotImplementedError, so None falls back to Triton.
  * "pallas_tpu": Pallas Mosaic TPU, scalar-prefetched lengths drive the block skipping; float32 / bfloat16.
  * None: "pallas_tpu" on TPU; on GPU "pallas_mosaic_gpu" for compute capability 9.x when it supports the
    dtype, else "pallas_triton"; "xla" on CPU. A backend that declares the inputs unsupported is passed over
    silently; one that raises NotImplementedError falls back to "xla" with one warning per (backend, reason).
Every Pallas backend skips fully masked blocks (the causal upper triangle, candidate-candidate blocks,
padding) with per-row-block loop bounds computed from lengths and num_targets (`masks.py`), runs interior
blocks without mask arithmetic, and adds each candidate's own diagonal term separately. Any L and head dim
work: inputs are zero-padded to the backend's tiles. All backends are differentiable in q, k, v through
`jax.custom_vjp` with a recomputing backward (no softmax, so no saved statistics); `block_sizes` overrides
a backend's default tiles (`config.py`).

`interpret=True` runs a Pallas backend on CPU: Triton kernels in the generic Pallas interpreter, TPU kernels
in the TPU interpreter, Mosaic GPU kernels in the Mosaic GPU interpreter (which simulates TMA, barriers and
warpgroups; it needs >= 2 host devices, and there the P / dS tiles reach wgmma through shared memory
instead of registers). All interpreters fill unwritten outputs with NaN.
"""

from __future__ import annotations

import importlib
import numbers
import warnings
import jax
import jax.experimental.pallas.fuser  # noqa: F401  (see below)
import jax.numpy as jnp

from kernels.hstu_attention.config import BlockSizes
from kernels.hstu_attention.reference import hstu_attention_xla

# The fuser import registers a config that is part of every jit cache key. Pallas imports it lazily in the
# first pallas_call, which changes the key after that first trace and makes every jitted caller of a Pallas
# backend compile twice; importing it when this module loads keeps the key stable from the start.

IMPLEMENTATIONS = ("xla", "pallas_triton", "pallas_mosaic_gpu", "pallas_tpu")

_PALLAS_MODULES = {
    "pallas_triton": "kernels.hstu_attention.pallas_triton",
    "pallas_mosaic_gpu": "kernels.hstu_attention.pallas_mosaic_gpu",
    "pallas_tpu": "kernels.hstu_attention.pallas_tpu",
}

_warned: set[tuple[str, str]] = set()


def _backend(implementation: str):
    """A Pallas backend module (imported lazily, on first use)."""
    return importlib.import_module(_PALLAS_MODULES[implementation])


def _gpu_is_hopper() -> bool:
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", "")
    return str(capability).startswith("9.")


def _auto_implementations() -> list[str]:
    """Backends to try for implementation=None on this platform, best first; "xla" is always the last resort."""
    platform = jax.default_backend()
    if platform == "tpu":
        return ["pallas_tpu", "xla"]
    if platform in ("gpu", "cuda"):
        if _gpu_is_hopper():
            return ["pallas_mosaic_gpu", "pallas_triton", "xla"]
        return ["pallas_triton", "xla"]
    return ["xla"]


def _check_static(name: str, value: object, *, allow_none: bool, minimum: int) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        kind = "None or " if allow_none else ""
        raise ValueError(f"hstu_attention: {name} must be {kind}a Python int >= {minimum}, got {value!r}")


def _validate(q, k, v, lengths, num_targets, normalizer, alpha, contextual_len, max_attn_len, implementation):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"hstu_attention: {name} must be [B, L, H, D], got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"hstu_attention: {name} must be floating point, got {x.dtype}")
    if q.shape != k.shape:
        raise ValueError(f"hstu_attention: q and k must have the same shape, got {q.shape} and {k.shape}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"hstu_attention: v must be [B, L, H, Dv] matching q's {q.shape[:3]}, got {v.shape}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"hstu_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, x in (("lengths", lengths), ("num_targets", num_targets)):
        if x is None:
            continue
        if x.shape != (q.shape[0],) or not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"hstu_attention: {name} must be an integer [B={q.shape[0]}] array, got {x.dtype}{list(x.shape)}")
    if lengths is None:
        raise ValueError("hstu_attention: lengths is required (int32 [B])")
    if isinstance(normalizer, jax.core.Tracer) or not isinstance(normalizer, numbers.Real) or not normalizer > 0:
        raise ValueError(f"hstu_attention: normalizer must be a static positive number, got {normalizer!r}")
    if alpha is not None and (isinstance(alpha, jax.core.Tracer) or not isinstance(alpha, numbers.Real)):
        raise ValueError(f"hstu_attention: alpha must be None or a static number, got {alpha!r}")
    _check_static("contextual_len", contextual_len, allow_none=False, minimum=0)
    _check_static("max_attn_len", max_attn_len, allow_none=True, minimum=0)
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"hstu_attention: implementation must be None or one of {IMPLEMENTATIONS}, got {implementation!r}")


def hstu_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    num_targets: jax.Array | None = None,
    *,
    normalizer: float,
    alpha: float | None = None,
    contextual_len: int = 0,
    max_attn_len: int | None = None,
    implementation: str | None = None,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """Target-aware HSTU attention, [B, L, H, Dv] in q's dtype (see the module docstring for the definition).

    `block_sizes` overrides a Pallas backend's default tiles (benchmark tuning); "xla" ignores it.
    """
    _validate(q, k, v, lengths, num_targets, normalizer, alpha, contextual_len, max_attn_len, implementation)
    seq_len = q.shape[1]
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, seq_len)
    if num_targets is None:
        num_targets = jnp.zeros_like(lengths)
    num_targets = jnp.clip(num_targets.astype(jnp.int32), 0, lengths)
    kwargs = dict(
        normalizer=float(normalizer),
        alpha=float(q.shape[-1] ** -0.5 if alpha is None else alpha),
        contextual_len=contextual_len,
        max_attn_len=max_attn_len,
    )
    if implementation is not None:
        candidates = [implementation]
    else:
        # A backend that plainly does not take these inputs (e.g. Mosaic GPU and float32) is passed over
        # silently; only a backend that was expected to run and raised NotImplementedError warns.
        candidates = [
            name for name in _auto_implementations()
            if name == "xla" or _backend(name).unsupported_reason(q, v) is None
        ]
    for name in candidates:
        if name == "xla":
            return hstu_attention_xla(q, k, v, lengths, num_targets, **kwargs)
        try:
            return _backend(name).hstu_attention(
                q, k, v, lengths, num_targets, interpret=interpret, block_sizes=block_sizes, **kwargs
            )
        except NotImplementedError as err:
            if implementation is not None:
                raise
            key = (name, str(err))
            if key not in _warned:
                _warned.add(key)
                warnings.warn(f"hstu_attention: {name} unavailable ({err}); falling back", RuntimeWarning, stacklevel=2)
    raise AssertionError("unreachable: 'xla' is always the last candidate")
