"""GenRank (spec §3): a causal transformer decoder with a candidate mask over action-oriented tokens.

Tokens (tokens.py): one per history event, phi(x) + phi(a) + context, and one per candidate, phi(x) + M +
context, where M is a learned "mask action"; the interleaved baseline (``model.tokens.layout="interleaved"``)
has two history tokens per event instead. L pre-norm decoder blocks (block.py) attend with the kernels'
target-aware mask: history causal, each candidate sees the whole history and itself, never another candidate;
softmax by default, ALiBi over positions (on) and time (off). A final LayerNorm and a multi-task MLP head read
the **candidate** outputs, one logit per task in ``schema.tasks``; the trainer's BCE therefore lands on candidate
positions only.

History outputs are stop-gradient in the paper's sense: no loss, no head, nothing reads them. Intermediate
history outputs reach the logits only as the next block's attention keys/values (that is the model); the last
block computes no history output at all (:meth:`encode_request` runs only its K/V projection), and in the
one-pass form (:meth:`sequence`) the last block's history rows are computed but have zero gradient (tested).

The interleaved baseline's candidates (UNCONFIRMED). In HSTU's interleaved sequence the action a_k is predicted
at the output of its item token x_k, so a candidate contributes its item token, whose output the head reads; its
action slot is masked, i.e. it is not built: a masked-action token that only the candidate's own tokens could
see and whose output is never read cannot change any logit under "candidates never see each other" (the
kernels' mask lets a candidate row see the history and itself only), so leaving it out is exact and saves the
work. So the two layouts differ exactly in the history: 2N tokens (attention ~4x, projections ~2x the cost)
against N. In the interleaved layout the ALiBi distance counts tokens, so an event's action token is one step
after its item token.

Serving split (``RankingModel``):

* :meth:`encode_request` (once per request): history tokens through every block, caching each block's history
  K/V (post-projection, as candidates read them) -- O(N^2) per block; the state also holds the candidates'
  shared context embedding (position 0, request 0, pre-request-time bucket) and, with time ALiBi, the history
  times and request time;
* :meth:`score` (per candidate chunk): candidate tokens through every block with ``hstu_attention_cached`` against
  that block's cached K/V -- O(C N) per block; chunks are independent, so any chunking gives the same logits.

:meth:`sequence` is the same model in one pass over the packed [history ; candidates] (``hstu_attention`` with
``num_targets``), for tests and inspection; its candidate rows equal :meth:`score`'s (tested).
GenRank has no item tower, so there is no item cache. Dropout keys come in as arguments (``train=True`` with
``model.dropout > 0`` needs one).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gesr_jax.data.batch import CANDIDATES, REQUEST, BatchSchema, check_part, lengths_mask, split_batch
from gesr_jax.layers.core import MLP, LayerNorm, fold, named_rngs
from gesr_jax.layers.sequence import encode_prefix, pack, run_packed, score_against_prefix, unpack_candidates
from gesr_jax.models.base import Batch, RankingModel
from gesr_jax.models.genrank.block import DecoderBlock
from gesr_jax.models.genrank.config import GenRankConfig
from gesr_jax.models.genrank.tokens import GenRankTokens, check_fields
from kernels.hstu_attention import geometric_alibi_slopes


class GenRank(RankingModel):
    """The GenRank ranking model; build with a :class:`GenRankConfig` and the dataset's :class:`BatchSchema`."""

    def __init__(self, config: GenRankConfig, schema: BatchSchema, *, rngs: nnx.Rngs):
        config.validate_for_build()
        check_fields(config, schema)
        self.config, self.schema = config, schema
        d, dec = config.embed_dim, config.decoder
        h = dec.heads
        base = rngs.params()  # each part's initial values come from its name (layers/core.named_rngs)
        self.tokens = GenRankTokens(config, schema, rngs=named_rngs(base, "tokens"))
        score_fn = "softmax" if dec.attention == "softmax" else "silu"
        self.blocks = nnx.List([
            DecoderBlock(
                d, heads=h, head_dim=dec.head_dim, mlp=dec.mlp, mlp_dim=dec.mlp_dim, score_fn=score_fn,
                normalizer=dec.normalizer, implementation=dec.attention_impl,
                dropout_rate=config.dropout, rngs=named_rngs(base, f"blocks/{i}"),
            )
            for i in range(dec.layers)
        ])  # fmt: skip
        self.norm_out = LayerNorm(d, rngs=named_rngs(base, "norm_out"))
        self.head = MLP(d, (*config.head_mlp, len(schema.tasks)), rngs=named_rngs(base, "head"),
                        in_name="embed", dropout_rate=config.dropout)  # fmt: skip
        learn = dec.learnable_slopes
        self.alibi_slopes = _slope_param(h) if learn and dec.alibi else None
        self.time_slopes = _slope_param(h) if learn and dec.time_alibi else None
        self.dtype = jnp.dtype(dec.compute_dtype)
        self.request_keys = self.tokens.needed_request_keys()
        self.candidate_keys = self.tokens.needed_candidate_keys()

    # --- attention biases ---

    def slopes(self) -> tuple[jax.Array | None, jax.Array | None]:
        """(position ALiBi slopes [H], time slopes [H]); None where that bias is off."""
        dec = self.config.decoder
        h = dec.heads
        alibi = time = None
        if dec.alibi:
            alibi = self.alibi_slopes[...] if self.alibi_slopes is not None else geometric_alibi_slopes(h)
        if dec.time_alibi:
            time = self.time_slopes[...] if self.time_slopes is not None else geometric_alibi_slopes(h)
        return alibi, time

    def bias_args(self, timestamps: jax.Array | None, prefix_timestamps: jax.Array | None = None) -> dict[str, Any]:
        """Kernel bias keyword arguments; ``prefix_timestamps`` only for the cached form."""
        alibi, time = self.slopes()
        args: dict[str, Any] = {"alibi_slopes": alibi}
        if time is not None:
            args |= {"time_slopes": time, "timestamps": timestamps}
            if prefix_timestamps is not None:
                args["prefix_timestamps"] = prefix_timestamps
        return args

    # --- the request / candidate split ---

    def _check_train(self, key: jax.Array | None, train: bool) -> jax.Array | None:
        if train and key is None and self.config.dropout > 0:
            raise ValueError("train=True with model.dropout > 0 needs a PRNG key")
        return key if train else None

    def encode_request(self, request: Batch, *, key: jax.Array | None = None, train: bool = False) -> dict:
        """The request state: {"kv": per-block history (k, v), "history_len" (tokens), "cand_ctx" [B, D], ...}."""
        key = fold(self._check_train(key, train), "history")
        check_part(request, self.request_keys, self.schema, REQUEST)
        request = {k: jnp.asarray(v) for k, v in request.items()}
        x, hlen, times, cand_ctx = self.tokens.history(request)
        _, cache = encode_prefix(
            self.blocks, x, hlen, dtype=self.dtype, need_outputs=False, key=key, **self.bias_args(times)
        )
        state = {"kv": cache, "history_len": hlen, "cand_ctx": cand_ctx}
        if self.config.decoder.time_alibi:
            state |= {"history_time": times, "request_time": request["request_time"].astype(jnp.int32)}
        return state

    def score(self, state, candidates: Batch, *, key=None, train=False, item_cache=None) -> dict[str, jax.Array]:
        """Logits ``{task: [B, C]}`` for a chunk of candidates (0 at padded slots); ``item_cache`` is unused."""
        key = self._check_train(key, train)
        _, c = check_part(candidates, self.candidate_keys, self.schema, CANDIDATES)
        candidates = {k: jnp.asarray(v) for k, v in candidates.items()}
        nc = candidates["num_candidates"]
        x = self.tokens.candidates(candidates, state["cand_ctx"])
        cand_times = None
        if self.config.decoder.time_alibi:
            cand_times = jnp.broadcast_to(state["request_time"][:, None], (x.shape[0], c))
        bias = self.bias_args(cand_times, state.get("history_time"))
        x = score_against_prefix(
            self.blocks, state["kv"], x, state["history_len"], nc, dtype=self.dtype, key=fold(key, "candidates"),
            **bias,
        )
        return self._logits(x, lengths_mask(nc, c)[..., None], fold(key, "head"))

    def _logits(self, x: jax.Array, valid: jax.Array, key: jax.Array | None) -> dict[str, jax.Array]:
        out = self.head(self.norm_out(x).astype(jnp.float32), key=key)
        out = jnp.where(valid, out, 0.0)
        return {task: out[..., t] for t, task in enumerate(self.schema.tasks)}

    # --- the one-pass form (tests, inspection) ---

    def pack_inputs(self, batch: Batch) -> dict[str, jax.Array]:
        """The packed [history ; candidates] inputs: tokens [B, Lh + C, D], lengths, num_targets, times, and
        ``history_len`` (history tokens: N-layout events, or 2x for interleaved)."""
        request, candidates = split_batch(batch, self.schema)
        request = {k: jnp.asarray(v) for k, v in request.items()}
        candidates = {k: jnp.asarray(v) for k, v in candidates.items()}
        hist, hlen, htimes, cand_ctx = self.tokens.history(request)
        cand = self.tokens.candidates(candidates, cand_ctx)
        nc = candidates["num_candidates"].astype(jnp.int32)
        ctimes = jnp.broadcast_to(request["request_time"].astype(jnp.int32)[:, None], cand.shape[:2])
        return {
            "tokens": pack(hist, cand, hlen, nc), "lengths": hlen + nc, "num_targets": nc,
            "times": pack(htimes, ctimes, hlen, nc), "history_len": hlen,
        }  # fmt: skip

    def sequence(
        self,
        batch: Batch,
        *,
        key: jax.Array | None = None,
        train: bool = False,
        probes: Sequence[jax.Array] | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(final-normed outputs [B, Lh + C, D] of every packed row, logits {task: [B, C]}) in one pass.

        ``probes`` (one [B, Lh + C, D] array per block, or None) are added to each block's output: their
        gradients show which rows of which block reach the logits (the stop-gradient test).
        """
        key = fold(self._check_train(key, train), "sequence")
        inputs = self.pack_inputs(batch)
        lengths, nc, hlen = inputs["lengths"], inputs["num_targets"], inputs["history_len"]
        valid = lengths_mask(lengths, inputs["tokens"].shape[1])[..., None]
        bias = self.bias_args(inputs["times"] if self.config.decoder.time_alibi else None)
        x = run_packed(self.blocks, inputs["tokens"], lengths, nc, dtype=self.dtype, key=key, probes=probes, **bias)
        outputs = jnp.where(valid, self.norm_out(x), 0.0).astype(jnp.float32)
        c = batch["cand_item"].shape[1]
        cand = unpack_candidates(x, hlen, nc, c)
        return outputs, self._logits(cand, lengths_mask(nc, c)[..., None], fold(key, "head"))


def _slope_param(heads: int) -> nnx.Param:
    """Learnable per-head slopes, initialised to the geometric 2^(-8h/H); gradients flow through the kernel."""
    return nnx.Param(geometric_alibi_slopes(heads), out_sharding=(None,), eager_sharding=False)
