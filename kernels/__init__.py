"""Custom kernels of gesr_jax; `kernels.hstu_attention` is the attention entry point the model uses."""
