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
   * explicit cross ``X = 0.4 min(#{h in H: creator_h = creator_j}, 3)`` -- a capped match count;
   * target-aware ``T = 0.8 sum_t 0.6^age_t [category_t = category_j]`` (``age`` 0 = most recent) --
     which part of the history matches decides the size, so a pooled history cannot carry it.

   ``P(consume) = sigmoid(base + cross_weight X + target_aware_weight T)``.
   ``P(engage | consume) = sigmoid(a_e + e_u + 0.7 q_j + 0.3 w_u . v_j + cross_weight 0.6
   min(#engaged history items by the same creator, 2) + target_aware_weight 0.3 T)``, and
   ``P(engage) = P(consume) P(engage | consume)``: engaging implies consuming, as in MovieLens.
   Labels are Bernoulli draws of these probabilities, which are returned as ``prob_<task>``.
5. **Feedback.** The items consumed at a request join the user's history right after it (before the
   next request), so every history is the user's own earlier consumption and lies strictly before
   its request time.
6. **Splits.** Per user, the last request is test, the second-to-last valid, earlier ones train
   (``data.max_requests_per_user`` > 0 keeps only the most recent ones).

``num_actions`` is 3 (0 pad, 1 consumed, 2 engaged). The oracle NE -- the NE of ``prob_<task>`` --
is the floor no model can beat; :func:`oracle_ne` computes it for a split. At the default sizes
(seed 0) the test split has consume rate ~0.33, oracle NE ~0.67 (consume) / ~0.69 (engage), while
the two-tower part alone, even with its true latents and a fitted calibration, reaches only ~0.81 /
~0.87: the planted cross and target-aware terms are worth ~20% relative NE.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from gesr_jax.data.batch import empty_batch, validate_batch
from gesr_jax.data.config import DataConfig
from gesr_jax.metrics import normalized_entropy

if TYPE_CHECKING:  # sources imports this module lazily; the annotation only needs the name
    from gesr_jax.data.sources import Splits

CREATOR_CAP = 3  # explicit cross count saturates here
RECENCY_DECAY = 0.6  # weight of a history event per step of age in the target-aware term
_CROSS_W, _TARGET_W = 0.4, 0.8
_ENGAGE_CREATOR_CAP, _ENGAGE_CROSS_W, _ENGAGE_TARGET_W = 2, 0.6, 0.3
# Set so that, at the default sizes, consume ~ 0.33 and engage ~ 0.18 (engage | consume ~ 0.55).
_CONSUME_BIAS, _ENGAGE_BIAS = -3.2, -1.8
_AFFINITY_SCALE = 0.6  # keeps the two-tower part from dominating the logit
_SLOT_MIX = (0.35, 0.25)  # shares of creator- and category-retrieved impressions; the rest by popularity
_START_TIME = 1_600_000_000


def generate_splits(data_config: DataConfig) -> Splits:
    """:class:`gesr_jax.data.sources.Splits` of the synthetic log (with ``prob_<task>`` filled)."""
    from gesr_jax.data.sources import Splits, schema_for

    parts, stats, _ = generate(data_config)
    return Splits(parts["train"], parts["valid"], parts["test"], schema_for(data_config), stats)


def generate(
    data_config: DataConfig,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Generate the log: ``(splits, stats, components)``.

    ``components[split]`` holds per-candidate logit parts (``consume_base``, ``consume_cross``,
    ``consume_target``, ``engage_base``, ...) for analysis and tests; they are not batch keys.
    """
    from gesr_jax.data.sources import schema_for

    dc, sc = data_config, data_config.synthetic
    schema = schema_for(dc)
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

    batch = empty_batch(schema, n_users * n_req)
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
        validate_batch(splits[name], schema)
    stats = {
        "users": n_users,
        "items": sc.num_items,
        "skipped_users": 0,
        **{f"requests_{n}": int(splits[n]["user_id"].size) for n in ("train", "valid", "test")},
        "consume_rate": float(batch["label_consume"].mean()),
        "engage_rate": float(batch["label_engage"].mean()),
        **{f"oracle_ne_{t}_test": oracle_ne(splits["test"], t) for t in ("consume", "engage")},
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
        w = np.where(age >= 0, RECENCY_DECAY ** np.maximum(age, 0), 0.0)
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
        """Per-candidate logit parts of step 4 (cross / target parts already scaled by the config weights)."""
        n = hist["item"].shape[1]
        valid = np.arange(n)[None, :] < h_len[:, None]
        age = h_len[:, None] - 1 - np.arange(n)[None, :]
        recency = np.where(valid, RECENCY_DECAY ** np.maximum(age, 0), 0.0)
        same_creator = (hist["creator"][:, None, :] == self.creator[cand][:, :, None]) & valid[:, None, :]
        same_category = (hist["category"][:, None, :] == self.category[cand][:, :, None]) & valid[:, None, :]
        n_creator = same_creator.sum(-1)
        n_engaged_creator = (same_creator & (hist["action"][:, None, :] == 2)).sum(-1)
        target = _TARGET_W * (same_category * recency[:, None, :]).sum(-1)
        affinity = _AFFINITY_SCALE * self.affinity(users[:, None], cand)
        return {
            "consume_base": _CONSUME_BIAS + self.bias[users][:, None] + self.quality[cand] + affinity,
            "consume_cross": sc.cross_weight * _CROSS_W * np.minimum(n_creator, CREATOR_CAP),
            "consume_target": sc.target_aware_weight * target,
            "engage_base": _ENGAGE_BIAS + self.engage_bias[users][:, None] + 0.7 * self.quality[cand] + 0.5 * affinity,
            "engage_cross": sc.cross_weight * _ENGAGE_CROSS_W * np.minimum(n_engaged_creator, _ENGAGE_CREATOR_CAP),
            "engage_target": sc.target_aware_weight * _ENGAGE_TARGET_W * target,
        }


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
    valid = slots < h_len[:, None]
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


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def oracle_ne(split: dict[str, np.ndarray], task: str) -> float:
    """Normalized entropy of the true probabilities ``prob_<task>``: the floor for any model on this split."""
    return normalized_entropy(split[f"label_{task}"], split[f"prob_{task}"], _cand_mask(split))


def calibrated_ne(labels: np.ndarray, logits: np.ndarray, mask: np.ndarray, iters: int = 25) -> float:
    """NE of ``sigmoid(a * logit + b)`` with (a, b) fitted by Newton's method on the same rows.

    Fitting on the evaluation rows makes this an optimistic bound for a predictor restricted to
    ``logits``; used to show what removing planted terms costs.
    """
    y, x = labels[mask].astype(np.float64), logits[mask].astype(np.float64)
    design = np.stack([x, np.ones_like(x)], axis=1)
    theta = np.zeros(2)
    for _ in range(iters):
        p = _sigmoid(design @ theta)
        grad = design.T @ (p - y)
        hess = design.T @ (design * (p * (1 - p))[:, None]) + 1e-9 * np.eye(2)
        theta -= np.linalg.solve(hess, grad)
    return normalized_entropy(y, _sigmoid(design @ theta), np.ones(y.shape, bool))


def _cand_mask(split: dict[str, np.ndarray]) -> np.ndarray:
    c = split["cand_item"].shape[1]
    return np.arange(c)[None, :] < split["num_candidates"][:, None]
