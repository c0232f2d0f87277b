"""GESR assembly: the two-tower primary path, the Mixture of Attention (MoA) and MLPG.

One forward pass (DESIGN.md "One forward pass"):

1. RO stage, once per request: user tower; history tokens; RO cross attention
   (history summary and profile embeddings); history K/V projections.
2. NRO stage: item tower (or a cached item-tower table); HMA counts against the sorted
   history; target-aware HSTU over [history ; candidates]; NRO cross attention.
3. Logits: main = interaction(u, i, [HMA, unified item embedding]);
   amplified = MLPG(target-aware user embs, NRO cross outputs, RO summary, RO profile);
   with ``model.use_mlpg=false`` those MLPG inputs join the main interaction MLP instead;
   final = main + amplified, one [B, C] array per task.

Routing of MoA outputs to the main path vs MLPG follows spec §1.9 (read off the paper's
figure; UNCONFIRMED). Each ``model.use_*`` switch removes its module and parameters;
with all of them off the model is exactly the two-tower baseline. Logits at padded
candidate slots are 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gesr_jax.data.batch import BatchSchema
from gesr_jax.models.config import ModelConfig
from gesr_jax.models.cross_attention import NROCrossAttention, ROCrossAttention
from gesr_jax.models.features import Batch, TokenEmbedder, check_batch, check_fields, valid_masks
from gesr_jax.models.hard_matching import HardMatching
from gesr_jax.models.hstu import TargetAwareHSTU
from gesr_jax.models.layers import fold
from gesr_jax.models.mlpg import MLPG
from gesr_jax.models.stochastic_length import stochastic_length
from gesr_jax.models.towers import TwoTower

# fold_in tags: one independent random stream per component.
_SL, _USER, _ITEM, _HMA, _HSTU, _RO, _INTER, _MLPG = range(8)


def _mlpg_input_widths(config: ModelConfig) -> dict[str, int]:
    """Widths of the MoA outputs that are routed to MLPG (spec §1.9) and switched on, in a fixed order."""
    d = config.embed_dim
    widths = {"hstu": d if config.use_hstu else 0}
    widths["ro_summary"] = config.ro_num_seeds * d if config.use_ro_cross else 0
    widths["ro_profile"] = d if config.use_ro_cross and config.ro_profile_query else 0
    widths["nro_cross"] = d if config.use_nro_cross else 0
    return {name: w for name, w in widths.items() if w}


class GESR(nnx.Module):
    """The GESR ranking model; build with a :class:`ModelConfig` and the dataset's :class:`BatchSchema`."""

    def __init__(self, config: ModelConfig, schema: BatchSchema, *, rngs: nnx.Rngs):
        config.validate_for_build()
        check_fields(config, schema)
        self.config, self.schema = config, schema
        d, num_tasks = config.embed_dim, len(schema.tasks)
        dims: dict[str, int] = {}  # width of every MoA output, for MLPG

        extra_dim = 0
        if not config.use_mlpg:
            # Without MLPG its inputs join the main interaction instead (the paper's "without MLPG" keeps
            # the attention modules; only the gated multi-logit branches go). Widths come from the config so
            # the modules below are created in the same order, with the same initial values, either way.
            extra_dim += sum(_mlpg_input_widths(config).values())
        self.hma = HardMatching(config, rngs=rngs) if config.use_hma else None
        if self.hma is not None:
            extra_dim += dims.setdefault("hma", self.hma.out_dim)
        self.tokens = TokenEmbedder(config, schema, rngs=rngs) if config.uses_tokens else None
        if self.tokens is not None:
            extra_dim += dims.setdefault("unified_item", d)
        self.towers = TwoTower(config, schema, extra_dim, num_tasks, rngs=rngs)

        self.hstu = TargetAwareHSTU(config, rngs=rngs) if config.use_hstu else None
        if self.hstu is not None:
            dims["hstu"] = d
        self.ro_cross = ROCrossAttention(config, rngs=rngs) if config.use_ro_cross else None
        if self.ro_cross is not None:
            dims["ro_summary"] = config.ro_num_seeds * d
            if config.ro_profile_query:
                if not self.towers.user.profile_fields():
                    raise ValueError(
                        "model.ro_profile_query=true needs user profile embeddings, but this model has none "
                        "(no user features and model.use_user_id=false)"
                    )
                dims["ro_profile"] = d
        self.nro_cross = NROCrossAttention(config, rngs=rngs) if config.use_nro_cross else None
        if self.nro_cross is not None:
            dims["nro_cross"] = d
        self.mlpg = MLPG(config, dims, num_tasks, rngs=rngs) if config.use_mlpg else None

    def needed_keys(self) -> tuple[str, ...]:
        """Batch keys this model reads (beyond history_item, cand_item and the two lengths)."""
        keys = list(self.towers.needed_keys())
        if self.hma is not None:
            keys += self.hma.needed_keys()
        if self.tokens is not None:
            keys += self.tokens.needed_keys()
        return tuple(dict.fromkeys(keys))

    def item_cache(self, item_fields: dict[str, jax.Array]) -> jax.Array:
        """Item-tower outputs for a table of items: ``item_fields[f]`` are [V] ids -> [V, Dt].

        With ``item_fields["item"] = arange(num_items + 1)`` row r is item r's embedding,
        the table ``__call__(..., item_cache=...)`` looks candidates up in.
        """
        return self.towers.item_embedding(item_fields)

    def __call__(
        self,
        batch: Batch,
        *,
        key: jax.Array | None = None,
        train: bool = False,
        item_cache: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """Final logits, one [B, C] array per task (0 at padded candidate slots)."""
        cfg = self.config
        if train and key is None and (cfg.dropout > 0 or cfg.stochastic_length):
            raise ValueError("train=True with model.dropout > 0 or model.stochastic_length needs a PRNG key")
        _, _, c = check_batch(batch, self.needed_keys())
        key = key if train else None
        if key is not None and cfg.stochastic_length:
            batch = stochastic_length(batch, fold(key, _SL), alpha=cfg.sl_alpha, sampling=cfg.sl_sampling)
        hist_valid, cand_valid = valid_masks(batch)
        hlen, ncand = batch["history_len"], batch["num_candidates"]

        u = self.towers.user_embedding(batch, key=fold(key, _USER))  # RO [B, Dt]
        if item_cache is not None:
            i = jnp.take(item_cache, batch["cand_item"], axis=0, mode="clip")
        else:
            i = self.towers.item_embedding(self.towers.candidate_fields(batch), key=fold(key, _ITEM))

        main_extras: list[jax.Array] = []
        moa: dict[str, jax.Array] = {}  # MLPG inputs: [B, C, *] per candidate or [B, 1, *] per request
        if self.hma is not None:
            moa["hma"] = self.hma(batch, key=fold(key, _HMA))
            main_extras.append(moa["hma"])
        if self.tokens is not None:
            history = self.tokens.history(batch)  # RO [B, N, D]
            moa["unified_item"] = self.tokens.unified_item(batch)
            main_extras.append(moa["unified_item"])
            if self.hstu is not None:
                moa["hstu"] = self.hstu(
                    history, self.tokens.candidates(batch, moa["unified_item"]), hlen, ncand, key=fold(key, _HSTU)
                )
            if self.ro_cross is not None:
                profile = self.towers.user.profile(batch) if cfg.ro_profile_query else None
                summary, prof = self.ro_cross(history, hist_valid, profile, key=fold(key, _RO))
                moa["ro_summary"] = summary[:, None, :]
                if prof is not None:
                    moa["ro_profile"] = prof[:, None, :]
            if self.nro_cross is not None:
                query = self.tokens.query(batch, moa["unified_item"])
                moa["nro_cross"] = self.nro_cross(query, history, hist_valid)

        if self.mlpg is None:
            for name in _mlpg_input_widths(cfg):
                main_extras.append(jnp.broadcast_to(moa[name], (*moa[name].shape[:1], c, moa[name].shape[-1])))
        logits = self.towers.interaction(u, i, main_extras, key=fold(key, _INTER))
        if self.mlpg is not None:
            logits = logits + self.mlpg(moa, c, key=fold(key, _MLPG))
        logits = jnp.where(cand_valid[..., None], logits, 0.0)
        return {task: logits[..., t] for t, task in enumerate(self.schema.tasks)}

    def hstu_sequence(self, batch: Batch) -> jax.Array:
        """The HSTU stack's packed output (eval mode), for inspection and the causality tests."""
        if self.hstu is None or self.tokens is None:
            raise ValueError("hstu_sequence needs model.use_hstu=true")
        return self.hstu.sequence(
            self.tokens.history(batch), self.tokens.candidates(batch), batch["history_len"], batch["num_candidates"]
        )
