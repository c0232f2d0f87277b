"""The "xla" backend (pure jnp, hand-written custom_vjp backward) against autodiff of the reference."""

import jax.numpy as jnp

from hstu_attention_cases import HSTUAttentionBackendTests


class TestXla(HSTUAttentionBackendTests):
    IMPLEMENTATION = "xla"
    DTYPES = (jnp.float32, jnp.bfloat16)
    BF16_CASES = ("mixed", "contextual_window")
    HYPOTHESIS_EXAMPLES = 15
    EXPORT_PLATFORMS = ("tpu", "cuda")
