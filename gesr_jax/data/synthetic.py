"""The embedded synthetic ESR log: impression-level requests with known true probabilities.

Generative story (sizes from ``SyntheticConfig``; everything is drawn from one
``numpy.random.Generator`` seeded by ``synthetic.seed``, so a seed fixes the data):

1. **Catalogue.** ``num_categories`` categories get latent centres ``g_k ~ N(0, I_d)``. Each of
   ``num_creators`` creators has a home category and a Zipf-like popularity. Every creator owns at
   least one item; the other items pick a creator by popularity. An item's category is its
   creator's home category with probability 0.8, else uniform. Item ``j`` has a quality ``q_j`` and
   a latent ``v_j = (g_{c_j} + 0.6 e_j) / sqrt(d)``.
2. **Users.** A user belongs to one of ``num_segments`` segments (user feature ``segment``) with
   taste ``w_u = m_s + 0.5 z_u``; a consumption propensity ``b_u`` (its quartile is the user
   feature ``activity``) and a hidden engagement propensity ``e_u``.
3. **Warm-up.** Before the first request each user consumes ``min_history..history_len`` items,
   one at a time: with probability 0.4 another item by the creator of an earlier one, otherwise
   the best of 20 popularity-drawn items under ``w_u . v_j`` plus Gumbel noise. Actions are
   1 (consumed) or 2 (consumed and engaged).
4. **Requests.** Each user makes ``requests_per_user`` requests, about a day apart. A request
   shows C = ``num_positives + num_negatives`` distinct items: ~35% by the creator of a
   recency-drawn history item, ~25% from a recent item's category, the rest by popularity.
   For candidate ``j`` with history H (the last ``history_len`` consumed items, oldest first):

   * two-tower part ``base = a + b_u + q_j + 0.6 w_u . v_j`` -- a function of the user alone plus the item
     alone, which a dot product of a user tower and an item tower can represent;
   * capped count ``X = 0.7 min(#{h in H: creator_h = creator_j}, 2)`` -- saturates after two matches,
     so the share of matching history items (what a mean-pooled history carries) misstates it;
   * last-engaged match ``L = 0.8 [creator_j = creator of the most recent engaged history item]`` -- a
     feature pair between the candidate and one specific history event;
   * target-aware ``T = 1.2 sum_t 0.3^age_t [category_t = category_j]`` (``age`` 0 = most recent) --
     only the last ~3 events count, so which part of the history matches decides the size.

   ``P(consume) = sigmoid(base + cross_weight (capped_count_weight X + last_engaged_weight L) +
   target_aware_weight T)``. ``P(engage | consume) = sigmoid(a_e + e_u + 0.7 q_j + 0.3 w_u . v_j +
   cross_weight (capped_count_weight 0.6 min(#engaged history items by the same creator, 1) +
   last_engaged_weight 0.6 [L's match]) + target_aware_weight 0.3 T)``, and
   ``P(engage) = P(consume) P(engage | consume)``: engaging implies consuming, as in MovieLens.
   Labels are Bernoulli draws of these probabilities, which are returned as ``prob_<task>``.
5. **Feedback.** The items consumed at a request join the user's history right after it (before the
   next request), so every history is the user's own earlier consumption and lies strictly before
   its request time.
6. **Splits.** Per user, the last request is test, the second-to-last valid, earlier ones train
   (``data.max_requests_per_user`` > 0 keeps only the most recent ones).

``num_actions`` is 3 (0 pad, 1 consumed, 2 engaged). Two references come with every log
(``stats``): the **oracle NE** -- the NE of ``prob_<task>`` on test, the floor no model can beat
(:func:`oracle_ne`) -- and the **decoupled ceiling** (:func:`decoupled_ceiling_ne`): the test NE of a
logistic regression, fitted on train, on the true two-tower parts plus the mean-pooled match shares
a two-tower can represent. What separates the two is what only a coupled (early-interaction) model
can learn. Measured (seed 0, consume / engage): at the default sizes the test consume rate is ~0.33,
oracle NE 0.634 / 0.677, decoupled ceiling 0.704 / 0.742 (gap 0.070 / 0.065), and the two-tower
part alone, with its true latents and a fitted calibration, 0.841 / 0.883. With the synthetic_base
data settings (4000 users, 12 requests, history 32): oracle 0.654 / 0.713, ceiling 0.708 / 0.757
(gap 0.054 / 0.044). Setting one knob to 0 (default sizes) shrinks the consume gap from 0.070 to
0.040 (capped count), 0.053 (last engaged), 0.035 (target-aware); with every planted term off the
ceiling equals the oracle. Generator seeds 1 and 2 give gaps 0.067 and 0.076.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gesr_jax.data.batch import BatchSchema, empty_batch, lengths_mask, validate_batch
from gesr_jax.data.config import DataConfig
from gesr_jax.data.datasets import Splits, register_dataset
from gesr_jax.data.synthetic_reference import (  # noqa: F401  (re-exported for analysis code)
    _sigmoid,
    calibrated_ne,
    decoupled_ceiling_ne,
    oracle_ne,
    pooled_match_shares,
)

TASKS = ("consume", "engage")  # the labels this generator draws (schema.tasks)
ACTIVITY_LEVELS = 4  # "activity" user feature: quartile of the user's consumption propensity
NUM_ACTIONS = 3  # 0 pad, 1 consumed, 2 consumed and engaged

CREATOR_CAP = 2  # the capped creator count saturates here: a 3rd, 4th... match adds nothing
RECENCY_DECAY = 0.3  # weight of a history event per step of age in the target-aware term: the last ~3 events count
_IMPRESSION_DECAY = 0.6  # recency weighting of the history items that retrieve impressions
_CROSS_W, _LAST_W, _TARGET_W = 0.7, 0.8, 1.2
_ENGAGE_CREATOR_CAP, _ENGAGE_CROSS_W, _ENGAGE_LAST_W, _ENGAGE_TARGET_W = 1, 0.6, 0.6, 0.3
# Set so that, at the default sizes, consume ~ 0.33 and engage ~ 0.18 (engage | consume ~ 0.55).
_CONSUME_BIAS, _ENGAGE_BIAS = -3.6, -1.8
_AFFINITY_SCALE = 0.6  # keeps the two-tower part from dominating the logit
_SLOT_MIX = (0.35, 0.25)  # shares of creator- and category-retrieved impressions; the rest by popularity
_START_TIME = 1_600_000_000


def schema(data_config: DataConfig) -> BatchSchema:
    """The batch schema of the synthetic log: features ``segment``/``activity`` and ``category``/``creator``."""
    sc = data_config.synthetic
    return BatchSchema(
        num_users=sc.num_users,
        num_items=sc.num_items,
        user_features=(("segment", sc.num_segments + 1), ("activity", ACTIVITY_LEVELS + 1)),
        item_features=(("category", sc.num_categories + 1), ("creator", sc.num_creators + 1)),
        num_actions=NUM_ACTIONS,
        history_len=data_config.history_len,
        num_candidates=data_config.num_candidates,
        tasks=TASKS,
        has_true_probs=True,
    )


def generate_splits(data_config: DataConfig) -> Splits:
    """:class:`gesr_jax.data.datasets.Splits` of the synthetic log (with ``prob_<task>`` filled)."""
    parts, stats, _ = generate(data_config)
    return Splits(parts["train"], parts["valid"], parts["test"], schema(data_config), stats)


class SyntheticDataset:
    """``data.source = "synthetic"`` in the dataset registry (gesr_jax/data/datasets.py)."""

    def schema(self, data_config: DataConfig) -> BatchSchema:
        return schema(data_config)

    def load_splits(self, data_config: DataConfig) -> Splits:
        return generate_splits(data_config)

    def item_table(self, data_config: DataConfig) -> dict[str, np.ndarray]:
        return item_table(data_config)


register_dataset("synthetic", SyntheticDataset())


def generate(
    data_config: DataConfig,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Generate the log: ``(splits, stats, components)``.

    ``components[split]`` holds per-candidate logit parts (``consume_base``, ``consume_cross``,
    ``consume_target``, ``engage_base``, ...) for analysis and tests; they are not batch keys.
    """
    data_config.validate()
    dc, sc = data_config, data_config.synthetic
    batch_schema = schema(dc)
    n_hist, n_cand, n_req, n_users = dc.history_len, dc.num_candidates, sc.requests_per_user, sc.num_users
    if sc.num_items < 2 * n_cand:
        raise ValueError(
            f"data.synthetic.num_items ({sc.num_items}) must be at least twice the candidates per request ({n_cand})"
        )
    rng = np.random.default_rng(sc.seed)
    world = _World(sc, rng)  # drawn first from the seed, so item_table() can rebuild it alone

    # Event log per user, appended in time order: [U, capacity].
    capacity = n_hist + n_req * n_cand
    ev_item = np.zeros((n_users, capacity), np.int64)
    ev_action = np.zeros((n_users, capacity), np.int64)
    ev_time = np.zeros((n_users, capacity), np.int64)
    ev_len = np.zeros(n_users, np.int64)
    rows = np.arange(n_users)

    # Warm-up: consumption before the first request, one step at a time across all users.
    warm = rng.integers(dc.min_history, n_hist + 1, size=n_users)
    first_request = _START_TIME + rng.integers(0, 30 * 86_400, size=n_users)
    for step in range(n_hist):
        active = step < warm
        pool = world.popular(rng, (n_users, 20))
        by_taste = pool[rows, np.argmax(world.affinity(rows[:, None], pool) + rng.gumbel(size=pool.shape), axis=1)]
        earlier = ev_item[rows, (rng.random(n_users) * np.maximum(ev_len, 1)).astype(np.int64)]
        same_creator = world.item_of_creator(rng, world.creator[earlier])
        pick = np.where((step > 0) & (rng.random(n_users) < 0.4), same_creator, by_taste)
        engaged = rng.random(n_users) < _sigmoid(world.engage_bias + world.quality[pick])
        when = first_request - (warm - step) * 6 * 3600 - rng.integers(1, 3600, size=n_users)
        _append(ev_item, ev_action, ev_time, ev_len, active, pick, 1 + engaged, when)

    batch = empty_batch(batch_schema, n_users * n_req)
    comps: dict[str, np.ndarray] = {}
    request_time = first_request.copy()
    for r in range(n_req):
        out = slice(r * n_users, (r + 1) * n_users)
        hist, h_len = _last_events(ev_item, ev_action, ev_time, ev_len, n_hist)
        hist["category"], hist["creator"] = world.category[hist["item"]], world.creator[hist["item"]]
        cand = world.impressions(rng, hist["item"], h_len, n_cand)
        parts = world.logits(rows, hist, h_len, cand, sc)
        p_consume = _sigmoid(parts["consume_base"] + parts["consume_cross"] + parts["consume_target"])
        p_engage_given = _sigmoid(parts["engage_base"] + parts["engage_cross"] + parts["engage_target"])
        consume = rng.random(cand.shape) < p_consume
        engage = consume & (rng.random(cand.shape) < p_engage_given)

        batch["user_id"][out] = rows + 1
        batch["user_segment"][out] = world.segment
        batch["user_activity"][out] = world.activity
        for field in ("item", "category", "creator", "action", "time"):
            batch[f"history_{field}"][out] = hist[field]
        batch["history_len"][out] = h_len
        batch["request_time"][out] = request_time
        batch["cand_item"][out] = cand
        batch["cand_category"][out] = world.category[cand]
        batch["cand_creator"][out] = world.creator[cand]
        batch["num_candidates"][out] = n_cand
        batch["label_consume"][out] = consume
        batch["label_engage"][out] = engage
        batch["prob_consume"][out] = p_consume
        batch["prob_engage"][out] = p_consume * p_engage_given
        for name, value in parts.items():
            comps.setdefault(name, np.zeros((n_users * n_req, n_cand), np.float32))[out] = value

        # Consumed items join the history between this request and the next, in shuffled order.
        gap = 3600 + rng.exponential(86_400, size=n_users).astype(np.int64)
        order = np.argsort(rng.random(cand.shape), axis=1)
        for k in range(n_cand):
            col = order[:, k]
            when = request_time + 1 + (k * gap) // (n_cand + 1)
            took = consume[rows, col]
            _append(ev_item, ev_action, ev_time, ev_len, took, cand[rows, col], 1 + engage[rows, col], when)
        request_time = request_time + gap

    # Rows are request-major; rank 0 = a user's last request.
    rank = np.repeat(np.arange(n_req)[::-1], n_users)
    keep = rank < dc.max_requests_per_user if dc.max_requests_per_user > 0 else np.ones(rank.size, bool)
    split_of = np.where(rank == 0, 2, np.where(rank == 1, 1, 0))
    order = np.lexsort((rank[::-1], np.tile(rows, n_req)))  # user-major, oldest request first
    splits, components = {}, {}
    for code, name in enumerate(("train", "valid", "test")):
        sel = order[(split_of[order] == code) & keep[order]]
        splits[name] = {k: v[sel] for k, v in batch.items()}
        components[name] = {k: v[sel] for k, v in comps.items()}
        validate_batch(splits[name], batch_schema)
    stats = {
        "users": n_users,
        "items": sc.num_items,
        "skipped_users": 0,
        **{f"requests_{n}": int(splits[n]["user_id"].size) for n in ("train", "valid", "test")},
        "consume_rate": float(batch["label_consume"].mean()),
        "engage_rate": float(batch["label_engage"].mean()),
        **{f"oracle_ne_{t}_test": oracle_ne(splits["test"], t) for t in batch_schema.tasks},
        **{f"decoupled_ceiling_ne_{t}_test": ne for t, ne in decoupled_ceiling_ne(splits, components).items()},
    }
    return splits, stats, components


def item_table(data_config: DataConfig) -> dict[str, np.ndarray]:
    """``category`` and ``creator`` id per item id ([num_items+1] int32, row 0 = padding) of this config's log."""
    world = _World(data_config.synthetic, np.random.default_rng(data_config.synthetic.seed))
    return {"category": world.category.astype(np.int32), "creator": world.creator.astype(np.int32)}


class _World:
    """The latent catalogue and users of one synthetic log (steps 1-2 of the story)."""

    def __init__(self, sc: Any, rng: np.random.Generator) -> None:
        d = sc.latent_dim
        creator_pop = 1.0 / np.arange(1, sc.num_creators + 1) ** 0.8
        creator_pop = rng.permutation(creator_pop / creator_pop.sum())
        home = rng.integers(1, sc.num_categories + 1, size=sc.num_creators + 1)
        # Every creator owns at least one item; the remaining items follow creator popularity.
        extra = 1 + rng.choice(sc.num_creators, size=sc.num_items - sc.num_creators, p=creator_pop)
        creator = np.r_[0, rng.permutation(np.arange(1, sc.num_creators + 1)), extra]
        category = np.where(
            rng.random(sc.num_items + 1) < 0.8,
            home[creator],
            rng.integers(1, sc.num_categories + 1, size=sc.num_items + 1),
        )
        category[0] = 0
        centres = rng.normal(size=(sc.num_categories + 1, d))
        self.creator, self.category = creator, category
        self.quality = np.r_[0.0, rng.normal(0.0, 0.5, size=sc.num_items)]
        self.latent = (centres[category] + 0.6 * rng.normal(size=(sc.num_items + 1, d))) / np.sqrt(d)
        self.latent[0] = 0.0
        exposure = np.exp(self.quality) * creator_pop[np.maximum(creator - 1, 0)]
        exposure[0] = 0.0
        self.exposure_cdf = np.cumsum(exposure) / exposure.sum()
        self.by_creator = np.argsort(creator, kind="stable")
        self.creator_start = np.searchsorted(creator[self.by_creator], np.arange(sc.num_creators + 2))
        self.by_category = np.argsort(category, kind="stable")
        self.category_start = np.searchsorted(category[self.by_category], np.arange(sc.num_categories + 2))
        self.segment = rng.integers(1, sc.num_segments + 1, size=sc.num_users)
        seg_centres = rng.normal(size=(sc.num_segments + 1, d))
        self.taste = seg_centres[self.segment] + 0.5 * rng.normal(size=(sc.num_users, d))
        self.bias = rng.normal(0.0, 0.5, size=sc.num_users)
        self.activity = 1 + np.searchsorted(np.quantile(self.bias, [0.25, 0.5, 0.75]), self.bias)
        self.engage_bias = rng.normal(0.0, 0.5, size=sc.num_users)

    def popular(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        return np.minimum(np.searchsorted(self.exposure_cdf, rng.random(shape), side="right"), self.quality.size - 1)

    def affinity(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        return np.einsum("...d,...d->...", self.taste[users], self.latent[items])

    def item_of_creator(self, rng: np.random.Generator, creators: np.ndarray) -> np.ndarray:
        return _pick_in_group(rng, self.by_creator, self.creator_start, creators)

    def impressions(self, rng: np.random.Generator, hist_item: np.ndarray, h_len: np.ndarray, c: int) -> np.ndarray:
        """``[U, c]`` distinct items shown at a request (step 4's slot mix)."""
        u, n = hist_item.shape
        age = (h_len[:, None] - 1 - np.arange(n)[None, :]).astype(np.float64)
        w = np.where(age >= 0, _IMPRESSION_DECAY ** np.maximum(age, 0), 0.0)
        cdf = np.cumsum(w, axis=1) / w.sum(axis=1, keepdims=True)
        slot = (rng.random((u, c))[:, :, None] > cdf[:, None, :]).sum(-1)
        src = hist_item[np.arange(u)[:, None], np.minimum(slot, h_len[:, None] - 1)]
        by_creator = self.item_of_creator(rng, self.creator[src])
        by_category = _pick_in_group(rng, self.by_category, self.category_start, self.category[src])
        kind = rng.random((u, c))
        cand = np.where(
            kind < _SLOT_MIX[0], by_creator, np.where(kind < sum(_SLOT_MIX), by_category, self.popular(rng, (u, c)))
        )
        for round_ in range(64):
            dup = ~_first_in_row(cand)
            if not dup.any():
                return cand
            fresh = self.popular(rng, cand.shape) if round_ < 8 else rng.integers(1, self.quality.size, size=cand.shape)
            cand = np.where(dup, fresh, cand)
        raise RuntimeError("could not draw distinct impressions; increase data.synthetic.num_items")

    def logits(
        self, users: np.ndarray, hist: dict[str, np.ndarray], h_len: np.ndarray, cand: np.ndarray, sc: Any
    ) -> dict[str, np.ndarray]:
        """Per-candidate logit parts of step 4 (planted parts already scaled by the config weights).

        ``<task>_cross`` = ``<task>_capped`` + ``<task>_last`` (both scaled by ``cross_weight``), so
        ``base + cross + target`` is the whole logit.
        """
        n = hist["item"].shape[1]
        valid = lengths_mask(h_len, n)
        age = h_len[:, None] - 1 - np.arange(n)[None, :]
        recency = np.where(valid, RECENCY_DECAY ** np.maximum(age, 0), 0.0)
        cand_creator = self.creator[cand]
        same_creator = (hist["creator"][:, None, :] == cand_creator[:, :, None]) & valid[:, None, :]
        same_category = (hist["category"][:, None, :] == self.category[cand][:, :, None]) & valid[:, None, :]
        n_creator = same_creator.sum(-1)
        n_engaged_creator = (same_creator & (hist["action"][:, None, :] == 2)).sum(-1)
        # The creator of the most recent engaged history event (0 = none, which no candidate has).
        engaged = valid & (hist["action"] == 2)
        last = n - 1 - np.argmax(engaged[:, ::-1], axis=1)
        last_creator = np.where(engaged.any(axis=1), hist["creator"][np.arange(cand.shape[0]), last], 0)
        last_match = cand_creator == last_creator[:, None]
        target = _TARGET_W * (same_category * recency[:, None, :]).sum(-1)
        affinity = _AFFINITY_SCALE * self.affinity(users[:, None], cand)
        capped = sc.cross_weight * sc.capped_count_weight * np.minimum(n_creator, CREATOR_CAP)
        engage_capped = sc.cross_weight * sc.capped_count_weight * np.minimum(n_engaged_creator, _ENGAGE_CREATOR_CAP)
        last_w = sc.cross_weight * sc.last_engaged_weight * last_match
        parts = {
            "consume_base": _CONSUME_BIAS + self.bias[users][:, None] + self.quality[cand] + affinity,
            "consume_capped": _CROSS_W * capped,
            "consume_last": _LAST_W * last_w,
            "consume_target": sc.target_aware_weight * target,
            "engage_base": _ENGAGE_BIAS + self.engage_bias[users][:, None] + 0.7 * self.quality[cand] + 0.5 * affinity,
            "engage_capped": _ENGAGE_CROSS_W * engage_capped,
            "engage_last": _ENGAGE_LAST_W * last_w,
            "engage_target": sc.target_aware_weight * _ENGAGE_TARGET_W * target,
        }
        for task in ("consume", "engage"):
            parts[f"{task}_cross"] = parts[f"{task}_capped"] + parts[f"{task}_last"]
        return parts


def _pick_in_group(rng: np.random.Generator, members: np.ndarray, start: np.ndarray, group: np.ndarray) -> np.ndarray:
    """A uniformly random member of each ``group`` (members sorted by group, ``start`` its offsets)."""
    lo, hi = start[group], start[group + 1]
    return members[lo + (rng.random(group.shape) * (hi - lo)).astype(np.int64)]


def _append(item, action, time, length, mask, new_item, new_action, new_time) -> None:
    rows = np.flatnonzero(mask)
    pos = length[rows]
    item[rows, pos], action[rows, pos], time[rows, pos] = new_item[rows], new_action[rows], new_time[rows]
    length[rows] += 1


def _last_events(item, action, time, length, n: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The last ``n`` events of each user, oldest first, right-padded with zeros."""
    h_len = np.minimum(length, n)
    slots = np.arange(n)[None, :]
    valid = lengths_mask(h_len, n)
    idx = np.where(valid, length[:, None] - h_len[:, None] + slots, 0)
    take = lambda a: np.where(valid, np.take_along_axis(a, idx, axis=1), 0)  # noqa: E731
    hist = {"item": take(item), "action": take(action), "time": take(time)}
    return hist, h_len


def _first_in_row(rows: np.ndarray) -> np.ndarray:
    order = np.argsort(rows, axis=1, kind="stable")
    srt = np.take_along_axis(rows, order, axis=1)
    first = np.ones(rows.shape, bool)
    first[:, 1:] = srt[:, 1:] != srt[:, :-1]
    out = np.empty(rows.shape, bool)
    np.put_along_axis(out, order, first, axis=1)
    return out


