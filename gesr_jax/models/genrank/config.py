"""GenRankConfig (``model.kind = "genrank"``): Xiaohongshu's generative ranker (spec §3, arXiv 2505.04180).

Kept free of JAX (reading a config stays cheap). The decoder and the tokens are typed sections
(``gesr_jax/models/config_sections.py``): ``model.decoder`` shares its execution fields (``attention_impl``,
``compute_dtype``, ``normalizer``, ``layers``, ``heads``) with GESR's ``model.hstu``, and ``model.tokens`` shares
its position / time fields with GESR's ``model.context``. Choices the paper leaves open are fields, the spec's
proposal as the default, each marked UNCONFIRMED:

* ``decoder.attention`` = "softmax" (ALiBi "fused into FlashAttention" implies softmax; "hstu" = HSTU's
  pointwise SiLU, divided by ``decoder.normalizer``) -- UNCONFIRMED;
* ALiBi distance in positions (``decoder.alibi``, on) and/or in time (``decoder.time_alibi``, off), slopes
  2^(-8h/H) (``geometric_alibi_slopes``), fixed or learnable (``decoder.learnable_slopes``), one set shared by
  every layer -- UNCONFIRMED;
* the request (session) of a history event is not in the batch: a new request starts where the gap to the
  previous event exceeds ``tokens.session_gap`` seconds -- UNCONFIRMED;
* the pre-request time bucket 1 + floor(ln(max(dt, 1)) / ``tokens.time_bucket_width``) -- UNCONFIRMED;
* the interleaved baseline's candidates contribute one (item) token each -- UNCONFIRMED (model.py docstring);
* SwiGLU MLP in the decoder blocks, an MLP multi-task head on the candidate outputs -- UNCONFIRMED.

``history_fields`` / ``candidate_fields`` are the dataset's item-field names (``item`` and the schema's item
features: "category", "creator" on the synthetic log; "genre", "year", "director" on ML-1M). The action
embedding phi(a) is always part of a history token, so "action" in ``history_fields`` is accepted and
redundant (a GESR config converted with ``--set model.kind=genrank`` keeps its fields). The model checks every
name against the batch schema when it is built.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from gesr_jax.models import config_sections as sections
from gesr_jax.models.config_base import ModelConfigBase


# Where each field of the flat GenRank config (workdirs written before the sections) lives now.
MOVED_FIELDS = {
    "genrank_tokens": "tokens.layout", "genrank_use_position_emb": "tokens.position",
    "genrank_use_request_emb": "tokens.request", "genrank_use_pre_request_time_emb": "tokens.time",
    "genrank_session_gap": "tokens.session_gap", "genrank_num_requests": "tokens.num_requests",
    "genrank_num_time_buckets": "tokens.num_time_buckets", "genrank_time_bucket_width": "tokens.time_bucket_width",
    "genrank_layers": "decoder.layers", "genrank_heads": "decoder.heads", "genrank_head_dim": "decoder.head_dim",
    "genrank_mlp": "decoder.mlp", "genrank_mlp_dim": "decoder.mlp_dim", "genrank_attention": "decoder.attention",
    "genrank_hstu_normalizer": "decoder.normalizer", "genrank_alibi": "decoder.alibi",
    "genrank_time_alibi": "decoder.time_alibi", "genrank_learnable_slopes": "decoder.learnable_slopes",
    "genrank_head_mlp": "head_mlp", "attention_impl": "decoder.attention_impl", "compute_dtype": "decoder.compute_dtype",
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class GenRankConfig(ModelConfigBase):
    kind: str = "genrank"  # registry key
    embed_dim: int = 32  # model width D: every embedding table and the decoder's residual stream
    history_fields: tuple[str, ...] = ("item", "category", "creator")  # item fields summed into phi(x) of history
    candidate_fields: tuple[str, ...] = ("item", "category", "creator")  # item fields summed into phi(x) of a candidate
    dropout: float = 0.1  # dropout on attention/MLP residual branches and head hidden layers (train=True only)
    tokens: sections.GenRankTokensSection = sections.GenRankTokensSection()  # token layout and context embeddings
    decoder: sections.DecoderSection = sections.DecoderSection()  # the causal decoder blocks
    head_mlp: tuple[int, ...] = (32,)  # hidden widths of the multi-task head (then one logit per task)

    # flat field of an older config.json -> its path now (config.from_dict moves them; --set names the new path)
    moved_fields: ClassVar[dict[str, str]] = MOVED_FIELDS

    @property
    def interleaved(self) -> bool:
        return self.tokens.layout == "interleaved"

    @property
    def item_history_fields(self) -> tuple[str, ...]:
        """``history_fields`` without "action" (phi(a) is added separately)."""
        return tuple(f for f in self.history_fields if f != "action")

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field (schema-dependent names are checked by the model)."""
        super().validate()
        if self.embed_dim < 1:
            raise ValueError(f"model.embed_dim must be >= 1, got {self.embed_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if any(w < 1 for w in self.head_mlp):
            raise ValueError(f"model.head_mlp widths must be >= 1, got {self.head_mlp}")
        if not self.item_history_fields:
            raise ValueError("model.history_fields needs at least one item field (e.g. 'item')")
        if not self.candidate_fields:
            raise ValueError("model.candidate_fields needs at least one item field (e.g. 'item')")
        if "action" in self.candidate_fields:
            raise ValueError("model.candidate_fields cannot hold 'action' (candidates carry the mask action M)")
        for name in ("history_fields", "candidate_fields"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"model.{name} names a field twice: {values}")
