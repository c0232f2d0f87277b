"""The pure-jnp backends: "xla" (`dense.py`, dense [B, H, rows, keys] scores; every platform, the oracle) and
"xla_blocked" (`blocked.py`, the same formulas over blocks of examples; the CPU default)."""
