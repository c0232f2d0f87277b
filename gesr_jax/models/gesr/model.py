"""GESR assembly: the two-tower primary path, the Mixture of Attention (MoA) and MLPG.

``encode_request`` (RO stage, once per request): stochastic length (training), user tower, MoA history
tokens, the user profile, and every component's request-only work (components.py): sorted HMA ids, the
HSTU history K/V of every layer, the RO cross-attention outputs, the NRO cross-attention history K/V.

``score`` (NRO stage, per candidate chunk): item tower (or the cached item-tower table), candidate tokens,
every "nro" component's per-candidate part, then the logits:
main = interaction(u, i, [main-route outputs, unified item]); amplified = MLPG(MLPG-route outputs; with
``model.mlpg.enabled=false`` they join the main interaction instead); final = main + amplified, per task.
Logits at padded candidate slots are 0.

Routing follows spec §1.9 (UNCONFIRMED). Each MoA switch (``model.hma.enabled``, ``model.hstu.enabled``,
``model.cross.ro`` / ``nro``, ``model.mlpg.enabled``) removes its module and parameters;
with all of them off the model is exactly the two-tower baseline (same modules, same order, same logits).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gesr_jax.config import ConfigError
from gesr_jax.data.batch import CANDIDATES, REQUEST, BatchSchema, batch_groups, check_part, lengths_mask
from gesr_jax.layers.core import fold, named_rngs
from gesr_jax.layers.mlpg import MLPG
from gesr_jax.layers.stochastic_length import stochastic_length
from gesr_jax.models.base import Batch, RankingModel
from gesr_jax.models.gesr import components
from gesr_jax.models.gesr.config import GESRConfig
from gesr_jax.models.gesr.moa import CandidateContext, RequestContext
from gesr_jax.models.gesr.tokens import TokenEmbedder, check_fields
from gesr_jax.models.two_tower.towers import TwoTower


class GESR(RankingModel):
    """The GESR ranking model; build with a :class:`GESRConfig` and the dataset's :class:`BatchSchema`."""

    def __init__(self, config: GESRConfig, schema: BatchSchema, *, rngs: nnx.Rngs):
        config.validate_for_build()
        check_fields(config, schema)
        self.config, self.schema = config, schema
        main, late = components.enabled(config, "main"), components.enabled(config, "mlpg")
        # (name, stage) per component, in table order (a tuple: the graphdef must hash).
        self.plan = tuple((c.name, c.stage) for c in (*main, *late))
        widths = dict(components.enabled_outputs(config))
        late_outputs = [n for c in late for n in c.outputs(config)]
        # Main-path inputs of the interaction, in a fixed order: main-route outputs, the unified item
        # embedding, and (without MLPG) the MLPG-route outputs.
        self.main_inputs = tuple(
            [n for c in main for n in c.outputs(config)]
            + ([components.UNIFIED_ITEM] if config.uses_tokens else [])
            + ([] if config.mlpg.enabled else late_outputs)
        )
        # Every part's initial values come from its name (layers/core.named_rngs), never from build order,
        # so switching a component on or off leaves the others' values unchanged.
        base = rngs.params()
        built = {
            c.name: c.module_class().from_config(config, schema, rngs=named_rngs(base, f"moa/{c.name}"))
            for c in (*main, *late)
        }
        self.tokens = TokenEmbedder(config, schema, rngs=named_rngs(base, "tokens")) if config.uses_tokens else None
        extra_dim = sum(widths[n] for n in self.main_inputs)
        self.towers = TwoTower(config, schema, extra_dim, len(schema.tasks), rngs=named_rngs(base, "towers"))
        if config.cross.ro and config.cross.profile_query and not self.towers.user.profile_fields():
            raise ConfigError(
                "model.cross.profile_query=true needs user profile embeddings, but this model has none "
                "(no user features and model.use_user_id=false)"
            )
        self.moa = nnx.Dict(built)
        self.mlpg = (
            MLPG(config.mlpg_branch_specs(), widths, len(schema.tasks), hidden=config.mlpg.hidden,
                 gate=config.mlpg.gate, dropout_rate=config.dropout, rngs=named_rngs(base, "mlpg"))
            if config.mlpg.enabled else None
        )  # fmt: skip
        keys = self._needed_keys()
        groups = batch_groups(schema)
        self.request_keys = tuple(k for k in keys if groups.get(k) == REQUEST)
        self.candidate_keys = tuple(k for k in keys if groups.get(k) == CANDIDATES)

    def _needed_keys(self) -> tuple[str, ...]:
        keys = list(self.towers.needed_keys())
        if "hma" in self.moa:
            keys += self.moa["hma"].needed_keys()
        if self.tokens is not None:
            keys += self.tokens.needed_keys()
        return tuple(dict.fromkeys(keys))

    def item_cache_fields(self) -> tuple[str, ...]:
        return self.towers.item.fields

    def item_cache(self, item_fields: Mapping[str, jax.Array]) -> jax.Array:
        """Item-tower outputs for a table of items: ``item_fields[f]`` are [V] ids -> [V (+ hashed rows), Dt]."""
        return self.towers.item_cache(item_fields)

    def user_embedding(self, state: Mapping[str, Any]) -> jax.Array:
        """The user vector [B, Dt] as it enters the two-tower dot product (for retrieval over the item cache)."""
        return self.towers.interaction.normalised(state["user"])

    def item_embedding_for_retrieval(self, item_cache: jax.Array) -> jax.Array:
        hashed = self.schema.hash_buckets  # the cache's last rows; retrieval ranks the items, not those rows
        return self.towers.interaction.normalised(item_cache[: item_cache.shape[0] - hashed])

    def encode_request(self, request: Batch, *, key: jax.Array | None = None, train: bool = False) -> dict:
        """The request state: {"user", "history_len", "history_valid", "moa": {component: cache}}."""
        cfg = self.config
        sl = cfg.stochastic_length
        if train and key is None and (cfg.dropout > 0 or sl.enabled):
            raise ValueError("train=True with model.dropout > 0 or model.stochastic_length.enabled needs a PRNG key")
        _, n = check_part(request, self.request_keys, self.schema, REQUEST)
        key = key if train else None
        request = {k: jnp.asarray(v) for k, v in request.items()}
        if key is not None and sl.enabled:
            request = stochastic_length(request, fold(key, "stochastic_length"), alpha=sl.alpha, sampling=sl.sampling)
        hlen = request["history_len"]
        ctx = RequestContext(
            request=request,
            history=self.tokens.history(request) if self.tokens is not None else None,
            history_valid=lengths_mask(hlen, n),
            history_len=hlen,
            profile=self.towers.user.profile(request) if self.towers.user.profile_fields() else None,
        )
        caches = {name: self.moa[name].encode_request(ctx, key=fold(key, f"moa/{name}")) for name, _ in self.plan}
        user = self.towers.user_embedding(request, key=fold(key, "towers/user"))
        return {"user": user, "history_len": hlen, "history_valid": ctx.history_valid, "moa": caches}

    def score(self, state, candidates: Batch, *, key=None, train=False, item_cache=None) -> dict[str, jax.Array]:
        """Final logits, one [B, C] array per task, for a chunk of candidates (0 at padded slots)."""
        _, c = check_part(candidates, self.candidate_keys, self.schema, CANDIDATES)
        key = key if train else None
        candidates = {k: jnp.asarray(v) for k, v in candidates.items()}
        ncand = candidates["num_candidates"]
        cand_valid = lengths_mask(ncand, c)
        i = self.towers.candidate_embedding(candidates, item_cache=item_cache, key=fold(key, "towers/item"))
        outputs: dict[str, jax.Array] = {}  # [B, C, *] per candidate or [B, 1, *] per request
        unified = tokens = None
        if self.tokens is not None:
            unified = self.tokens.unified_item(candidates)
            tokens = self.tokens.candidates(candidates, unified)
            outputs[components.UNIFIED_ITEM] = unified
        ctx = CandidateContext(
            candidates=candidates, tokens=tokens, unified=unified,
            query=lambda: self.tokens.query(candidates, unified),
            valid=cand_valid, num_candidates=ncand,
            history_valid=state["history_valid"], history_len=state["history_len"],
        )  # fmt: skip
        for name, stage in self.plan:
            cache = state["moa"][name]
            if stage == "ro":
                outputs.update(cache)  # computed once per request in encode_request
            else:
                outputs.update(self.moa[name].score_candidates(cache, ctx, key=fold(key, f"moa/{name}")))

        extras = [_broadcast(outputs[name], c) for name in self.main_inputs]
        logits = self.towers.interaction(state["user"], i, extras, key=fold(key, "towers/interaction"))
        if self.mlpg is not None:
            logits = logits + self.mlpg(outputs, c, key=fold(key, "mlpg"))
        logits = jnp.where(cand_valid[..., None], logits, 0.0)
        return {task: logits[..., t] for t, task in enumerate(self.schema.tasks)}

    def hstu_sequence(self, batch: Batch) -> jax.Array:
        """The HSTU stack's one-pass packed output (eval mode), for inspection and the causality tests."""
        if "hstu" not in self.moa or self.tokens is None:
            raise ValueError("hstu_sequence needs model.hstu.enabled=true")
        return self.moa["hstu"].sequence(
            self.tokens.history(batch), self.tokens.candidates(batch), batch["history_len"], batch["num_candidates"]
        )


def _broadcast(x: jax.Array, c: int) -> jax.Array:
    """A per-request output [B, 1, w] as [B, C, w] (a broadcast, not a copy, until XLA fuses it)."""
    return jnp.broadcast_to(x, (x.shape[0], c, x.shape[-1]))
