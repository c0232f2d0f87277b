"""The "pallas_mosaic_gpu" backend: target-aware ranking attention in Pallas Mosaic GPU for Hopper (sm_90),
warp specialised with TMA, mbarriers and wgmma (see `forward.py`). One set of kernels runs both modes: the
forward (`forward.py`), dq (`backward_dq.py`) and dk/dv (`backward_dkdv.py`); `full.py` and `cached.py` wrap them
as differentiable functions; what they share (schedules, producer, masks per mode): `_common.py`.

Operands are bfloat16/float16 only. float32 inputs are declared unsupported rather than cast inside: a bf16
cast would silently drop the precision a float32 caller asked for (the float32 checks hold kernels to ~1e-5),
and wgmma's tf32 path is not wired up; implementation=None then picks Triton, which runs float32 natively.
"""

from __future__ import annotations

import functools

from kernels.hstu_attention.backends.mosaic_gpu import cached, full
from kernels.hstu_attention.base import Backend
from kernels.hstu_attention.config import BlockSizes

# Its tiles are the warpgroup/wgmma shapes, not free parameters; L is padded to them instead (fit_tiles=False).
DEFAULT_BLOCKS = BlockSizes(block_q=64, block_k=128, block_q_bwd=64, block_k_bwd=64)
TUNING = (
    DEFAULT_BLOCKS,
    BlockSizes(block_q=64, block_k=64, block_q_bwd=64, block_k_bwd=64),
    BlockSizes(block_q=64, block_k=128, block_q_bwd=128, block_k_bwd=64),
    BlockSizes(block_q=64, block_k=64, block_q_bwd=128, block_k_bwd=64),
)


def _is_hopper(device) -> bool:
    return str(getattr(device, "compute_capability", "")).startswith("9.")


BACKEND = Backend(
    name=full.NAME,
    module=__name__,
    platforms=("gpu",),
    dtypes=("bfloat16", "float16"),
    priority=20,
    fit_tiles=False,
    device_ok=_is_hopper,
    score_fns=("silu", "softmax"),
    biases=frozenset({"alibi", "time"}),
    modes=("full", "cached"),
    default_blocks=DEFAULT_BLOCKS,
    tuning=TUNING,
    attention=functools.partial(full.attention, default_blocks=DEFAULT_BLOCKS),
    attention_cached=functools.partial(cached.attention_cached, default_blocks=DEFAULT_BLOCKS),
)
