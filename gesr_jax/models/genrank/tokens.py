"""GenRank input tokens (spec §3.3): e = phi(x) + phi(a or M) + E_pos + E_req_idx + E_pre_req_time.

Action-oriented layout (``model.tokens.layout = "action"``, the paper's model), one token per event:

* history event i: phi(x_i) + phi(a_i) + ctx_i, with phi(x) the sum of ``model.history_fields`` embeddings
  (item id and side features) and phi(a) the action embedding;
* candidate c: phi(x_c) (``model.candidate_fields``, the same tables) + M, a learned "mask action" + ctx_cand.

Interleaved layout (``"interleaved"``, the HSTU-style baseline): history event i gives two tokens, item
token phi(x_i) + ctx_i then action token phi(a_i) + ctx_i, i.e. [x_1, a_1, x_2, a_2, ...] (2N slots, valid length
2 * history_len, still right-padded); a candidate gives its item token phi(x_c) + ctx_cand (no M: its action slot
is the token that is never built, see model.py).

The per-event context ctx (each term has a switch):

* E_pos: the index counted back from the most recent event (1 = most recent, ..., N), so right padding never
  shifts it; all candidates share index 0. Both tokens of an interleaved event share their event's index.
* E_req_idx: the request the event came from. The batch has no request id per event, so it is derived from
  ``history_time`` (:func:`sessions`): a new request starts at the first event and wherever the gap to the
  previous event exceeds ``model.tokens.session_gap`` seconds (UNCONFIRMED). Requests are counted back from the
  most recent history request (= 1); candidates get 0, the current request; indices clip to the table's last
  row (``model.tokens.num_requests`` - 1).
* E_pre_req_time: the gap dt between the event's request start and the previous request's start, bucketed as
  1 + floor(ln(max(dt, 1)) / ``model.tokens.time_bucket_width``) clipped to [1, num_buckets - 1]; bucket 0 =
  no previous request visible (the oldest request in the window, or an empty history for candidates). For the
  candidates dt = request_time - start of the most recent history request. (Bucketing UNCONFIRMED; width 0.301
  is HSTU's rab bucket width.)
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from gesr_jax.config import ConfigError
from gesr_jax.data.batch import BatchSchema, lengths_mask
from gesr_jax.layers.core import Embed, FieldTables, embed_init, make_param
from gesr_jax.models.genrank.config import GenRankConfig
from gesr_jax.models.two_tower.towers import item_field_names

Batch = Mapping[str, jax.Array]


def check_fields(config: GenRankConfig, schema: BatchSchema) -> None:
    """Raise ``ConfigError`` naming the config key when it names a field this dataset does not have."""
    items = item_field_names(schema)
    for key, names in (("history_fields", config.item_history_fields), ("candidate_fields", config.candidate_fields)):
        for name in names:
            if name not in items:
                raise ConfigError(
                    f"model.{key} names {name!r}, which this dataset does not have; available: {list(items)}"
                )


def _take(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x[b, idx[b, ...]] along axis 1 (indices clipped into range)."""
    return jnp.take_along_axis(x, jnp.clip(idx, 0, x.shape[1] - 1), axis=1)


def sessions(history_time: jax.Array, history_len: jax.Array, gap: int) -> dict[str, jax.Array]:
    """Requests (sessions) of the history, derived from event times (oldest first, right padded).

    Returns ``index`` [B, N] (1 = most recent request, 0 at padding), ``start`` [B, N] (start time of each
    event's request), ``pre_gap`` [B, N] (its start minus the previous request's start; 0 where ``has_prev`` is
    false), ``has_prev`` [B, N], and per row ``last_start`` [B] (start of the most recent request) and
    ``has_history`` [B].
    """
    t = history_time.astype(jnp.int32)
    n = t.shape[1]
    pos = jnp.arange(n, dtype=jnp.int32)[None, :]
    valid = lengths_mask(history_len, n)
    prev_t = jnp.concatenate([t[:, :1], t[:, :-1]], axis=1)
    new = valid & ((pos == 0) | ((t - prev_t) > gap))
    forward = jnp.cumsum(new.astype(jnp.int32), axis=1)  # 1-based request number from the oldest
    last = jnp.clip(history_len - 1, 0, n - 1)[:, None]
    total = _take(forward, last)
    index = jnp.where(valid, total - forward + 1, 0)
    boundary = jax.lax.cummax(jnp.where(new, pos, 0), axis=1)  # first event of each event's request
    start = _take(t, boundary)
    has_prev = valid & (boundary > 0)
    prev_start = _take(start, boundary - 1)
    pre_gap = jnp.where(has_prev, start - prev_start, 0)
    return {
        "index": index, "start": start, "pre_gap": pre_gap, "has_prev": has_prev,
        "last_start": _take(start, last)[:, 0], "has_history": history_len > 0,
    }  # fmt: skip


def time_bucket(dt: jax.Array, has: jax.Array, num_buckets: int, width: float) -> jax.Array:
    """1 + floor(ln(max(dt, 1)) / width) clipped to [1, num_buckets - 1] where ``has``, else 0."""
    raw = jnp.floor(jnp.log(jnp.maximum(dt.astype(jnp.float32), 1.0)) / width).astype(jnp.int32)
    if num_buckets == 1:  # one row: every gap shares it
        return jnp.zeros_like(raw)
    return jnp.where(has, jnp.clip(1 + raw, 1, num_buckets - 1), 0)


def interleave(first: jax.Array, second: jax.Array) -> jax.Array:
    """[B, N, ...] and [B, N, ...] -> [B, 2N, ...] rows first_0, second_0, first_1, second_1, ..."""
    both = jnp.stack([first, second], axis=2)
    return both.reshape(first.shape[0], 2 * first.shape[1], *first.shape[2:])


class GenRankTokens(nnx.Module):
    """History and candidate tokens of either layout (module doc)."""

    def __init__(self, config: GenRankConfig, schema: BatchSchema, *, rngs: nnx.Rngs):
        d = config.embed_dim
        self.history_fields = config.item_history_fields
        self.candidate_fields = tuple(config.candidate_fields)
        fields = dict.fromkeys((*self.history_fields, *self.candidate_fields))
        self.tables = FieldTables({f: schema.item_vocab(f) for f in fields}, d, rngs=rngs,
                                  hash_buckets={f: schema.item_hash_buckets(f) for f in fields})  # fmt: skip
        self.action = Embed(schema.item_vocab("action"), d, rngs=rngs)
        self.interleaved = config.interleaved
        self.mask_action = None if self.interleaved else make_param(rngs, embed_init, (d,), ("embed",))
        self.max_position = schema.history_len
        tokens = config.tokens
        self.position = Embed(schema.history_len + 1, d, rngs=rngs) if tokens.position else None
        self.num_requests = tokens.num_requests
        self.request = Embed(tokens.num_requests, d, rngs=rngs) if tokens.request else None
        self.num_buckets = tokens.num_time_buckets
        self.bucket_width = tokens.time_bucket_width
        self.pre_time = Embed(tokens.num_time_buckets, d, rngs=rngs) if tokens.time else None
        self.session_gap = int(tokens.session_gap)

    def needed_request_keys(self) -> tuple[str, ...]:
        keys = [f"history_{f}" for f in self.history_fields]
        return tuple(dict.fromkeys([*keys, "history_action", "history_time", "request_time"]))

    def needed_candidate_keys(self) -> tuple[str, ...]:
        return tuple(f"cand_{f}" for f in self.candidate_fields)

    def context(self, request: Batch) -> tuple[jax.Array, jax.Array]:
        """(per-event context [B, N, D], the candidates' shared context [B, D]): E_pos + E_req_idx + E_pre_req_time."""
        hlen = request["history_len"]
        b, n = request["history_item"].shape
        d = self.action.table.shape[-1]
        event = jnp.zeros((b, n, d), jnp.float32)
        cand = jnp.zeros((b, d), jnp.float32)
        if self.position is not None:
            pos = jnp.clip(hlen[:, None] - jnp.arange(n)[None, :], 1, self.max_position)
            event = event + self.position(pos)
            cand = cand + self.position.table[...][0]
        if self.request is not None or self.pre_time is not None:
            s = sessions(request["history_time"], hlen, self.session_gap)
            if self.request is not None:
                event = event + self.request(jnp.clip(s["index"], 1, self.num_requests - 1))
                cand = cand + self.request.table[...][0]
            if self.pre_time is not None:
                event = event + self.pre_time(time_bucket(s["pre_gap"], s["has_prev"], self.num_buckets,
                                                          self.bucket_width))
                cand_dt = request["request_time"].astype(jnp.int32) - s["last_start"]
                cand = cand + self.pre_time(time_bucket(cand_dt, s["has_history"], self.num_buckets,
                                                        self.bucket_width))
        return event, cand

    def history(self, request: Batch) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """(tokens [B, Lh, D], valid lengths [B], token times [B, Lh], candidate context [B, D]); Lh = N or 2N.

        Padded token slots are zero (times too).
        """
        hlen = request["history_len"].astype(jnp.int32)
        n = request["history_item"].shape[1]
        valid = lengths_mask(hlen, n)[..., None]
        ctx, cand_ctx = self.context(request)
        item = self.tables.sum(request, self.history_fields, "history_")
        action = self.action(request["history_action"])
        times = jnp.where(valid[..., 0], request["history_time"].astype(jnp.int32), 0)
        if not self.interleaved:
            return jnp.where(valid, item + action + ctx, 0.0), hlen, times, cand_ctx
        tokens = interleave(jnp.where(valid, item + ctx, 0.0), jnp.where(valid, action + ctx, 0.0))
        return tokens, 2 * hlen, interleave(times, times), cand_ctx

    def candidates(self, candidates: Batch, cand_ctx: jax.Array) -> jax.Array:
        """Candidate tokens [B, C, D] (action layout: + M); padded slots are zero."""
        x = self.tables.sum(candidates, self.candidate_fields, "cand_") + cand_ctx[:, None, :]
        if self.mask_action is not None:
            x = x + self.mask_action[...]
        valid = lengths_mask(candidates["num_candidates"], x.shape[1])
        return jnp.where(valid[..., None], x, 0.0)
