"""Multi-Logit Parameterized Gating (MLPG, spec §1.10): K parallel logit branches over MoA outputs.

A branch reads its own list of MoA outputs ``z = [z_1, ..., z_m]`` (``model.mlpg.branches``)
and produces one logit per task:

* "gated" (parameterized gating): ``Logit(z) = MLP([Gate(z) * MLP(z), z])`` with
  ``Gate(z) = sigmoid(W_g z + b_g)`` (or ``2 * sigmoid`` for "lhuc"): per-example,
  per-dimension weights that amplify or suppress hidden features.
* "mlp": ``Logit(z) = MLP(z)``.

The branch logits are summed into the "amplified logits", which the model adds to the
main logits per task. Gate form, K and the additive "Combine" are UNCONFIRMED (spec §1.10).

Inputs are either per candidate [B, C, D] or per request [B, 1, D]. Every layer that
reads ``z`` is a :class:`MultiInputDense`, so a per-request input is projected once per
request and only broadcast after projection; nothing is copied per candidate.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from gesr_jax.layers.core import Dense, MultiInputDense, dropout, fold, named_rngs


class MLPGBranch(nnx.Module):
    """One logit branch, "gated" or "mlp", over the named inputs; output [B, C or 1, T]."""

    def __init__(
        self,
        kind: str,
        inputs: tuple[str, ...],
        dims: Mapping[str, int],
        num_tasks: int,
        *,
        hidden: int,
        gate: str,
        dropout_rate: float,
        rngs: nnx.Rngs,
    ):
        self.kind, self.inputs = kind, inputs
        in_dims = [dims[name] for name in inputs]
        base = rngs.params()  # each part's initial values come from its name (layers/core.named_rngs)
        self.hidden = MultiInputDense(in_dims, hidden, rngs=named_rngs(base, "hidden"))
        if kind == "gated":
            self.gate = MultiInputDense(in_dims, hidden, rngs=named_rngs(base, "gate"))
            self.mix = MultiInputDense([hidden, *in_dims], hidden, rngs=named_rngs(base, "mix"))
        else:
            self.gate = None
            self.mix = None
        self.out = Dense(hidden, num_tasks, rngs=named_rngs(base, "out"), names=("mlp", None))
        self.lhuc = gate == "lhuc"
        self.dropout_rate = dropout_rate

    def __call__(self, values: Mapping[str, jax.Array], *, key: jax.Array | None = None) -> jax.Array:
        z = [values[name] for name in self.inputs]
        h = dropout(jax.nn.silu(self.hidden(z)), self.dropout_rate, fold(key, 0))
        if self.gate is not None:
            g = jax.nn.sigmoid(self.gate(z))
            if self.lhuc:
                g = 2.0 * g
            h = dropout(jax.nn.silu(self.mix([g * h, *z])), self.dropout_rate, fold(key, 1))
        return self.out(h)


class MLPG(nnx.Module):
    """Sum of the configured branches: the amplified logits [B, C, T]."""

    def __init__(
        self,
        specs: tuple[tuple[str, tuple[str, ...]], ...],
        dims: Mapping[str, int],
        num_tasks: int,
        *,
        rngs: nnx.Rngs,
        **branch_args,
    ):
        """``specs``: (kind, input names) per branch; ``dims``: width of every available input;
        ``branch_args``: ``hidden``, ``gate``, ``dropout_rate`` of :class:`MLPGBranch`."""
        missing = sorted({name for _, inputs in specs for name in inputs} - set(dims))
        if missing:
            raise ValueError(f"model.mlpg.branches reads {missing}, which this model does not compute")
        base = rngs.params()  # branch i draws from stream i, whatever the other branches read
        self.branches = nnx.List([
            MLPGBranch(kind, inputs, dims, num_tasks, rngs=named_rngs(base, i), **branch_args)
            for i, (kind, inputs) in enumerate(specs)
        ])

    def __call__(self, values: Mapping[str, jax.Array], num_candidates: int, *, key: jax.Array | None = None):
        total = sum(branch(values, key=fold(key, i)) for i, branch in enumerate(self.branches))
        # A branch over per-request inputs only yields [B, 1, T]; give the caller [B, C, T].
        return jnp.broadcast_to(total, (*total.shape[:-2], num_candidates, total.shape[-1]))
