"""Shared blocks, built from explicit arguments (widths, heads, dropout), never from a model config.

``core`` (Dense, MLP, Embed, FieldTables, LayerNorm, dropout), ``hstu`` (HSTU layer, stack, target-aware
stack with request encoding / candidate scoring), ``cross_attention`` (seed and gated cross attention),
``hard_matching`` (HMA counts), ``mlpg`` (gated logit branches), ``stochastic_length`` and ``quantize``.
Models in ``gesr_jax.models.<family>`` assemble them.
"""
