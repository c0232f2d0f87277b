"""global_time_user_holdout (issue 22 item 2): valid and test are disjoint halves of the post-cut-2 users."""

import functools

import numpy as np

from gesr_jax.data import requests


def test_user_holdout_halves_the_late_users_and_moves_the_middle_to_train():
    rng = np.random.default_rng(0)
    users = rng.integers(1, 200, 5000)
    split_of = rng.integers(0, 3, 5000)
    out = requests.user_holdout_splits(split_of, users, seed=3)
    assert np.all(out[split_of == 0] == 0) and np.all(out[split_of == 1] == 0)  # between the cuts -> train
    late = split_of == 2
    assert np.all(out[late] >= 1)
    valid_users, test_users = set(users[late & (out == 1)]), set(users[late & (out == 2)])
    assert not valid_users & test_users  # held out by user
    assert abs(len(valid_users) - len(test_users)) <= 1 and valid_users | test_users == set(users[late])
    np.testing.assert_array_equal(out, requests.user_holdout_splits(split_of, users, seed=3))  # seeded
    assert not np.array_equal(out, requests.user_holdout_splits(split_of, users, seed=4))


def test_user_holdout_keeps_each_users_split_index_monotone():
    # One user's rows, most recent first: 2, 2, 1, 0 under global_time -> (1 or 2), same, 0, 0.
    out = requests.user_holdout_splits(np.array([2, 2, 1, 0]), np.array([5, 5, 5, 5]), seed=0)
    assert out[0] == out[1] and out[0] in (1, 2) and list(out[2:]) == [0, 0]


def test_split_shares_are_the_kept_requests_not_the_quantiles():
    from gesr_jax.data import commands

    shares = commands.split_shares({"requests_train": 760, "requests_valid": 120, "requests_test": 120})
    assert shares == {"train": 0.76, "valid": 0.12, "test": 0.12}
    assert commands.split_shares({}) == {"train": 0.0, "valid": 0.0, "test": 0.0}


def test_data_split_user_holdout_builds_valid_and_test_from_disjoint_late_users():
    """End to end through build_requests: data.movielens.split='global_time_user_holdout' is a valid config value, train
    keeps every request before cut 2, and valid / test hold the same kind of (late) requests of disjoint users."""
    from test_global_time_split import _build, _random_log

    inter = _random_log(seed=1, users=60)
    holdout = _build(inter, split="global_time_user_holdout")
    plain = _build(inter, split="global_time")
    users = {name: set(np.asarray(getattr(holdout, name)["user_id"]).tolist()) for name in ("valid", "test")}
    assert users["valid"] and users["test"] and not users["valid"] & users["test"]
    # Valid's requests all come after cut 2, like test's: none is earlier than the plain split's first test request.
    first_test = np.min(np.asarray(plain.test["request_time"]))
    assert np.min(np.asarray(holdout.valid["request_time"])) >= first_test
    n = lambda built: sum(int(np.asarray(getattr(built, s)["user_id"]).size) for s in ("train", "valid", "test"))
    assert n(holdout) == n(plain)  # every request lands in exactly one split


def test_the_holdout_halves_follow_holdout_seed_not_data_seed(monkeypatch):
    import test_global_time_split as gts

    inter = gts._random_log(seed=1, users=60)
    users = {}
    for seed, holdout in ((0, 0), (5, 0), (0, 7)):
        # _build passes movielens fields by their legacy flat names; holdout_seed is new, so patch the section
        section = functools.partial(gts.MovieLensConfig, holdout_seed=holdout)
        monkeypatch.setattr(gts, "MovieLensConfig", section)
        built = gts._build(inter, split="global_time_user_holdout", seed=seed)
        monkeypatch.undo()
        users[seed, holdout] = set(np.unique(built.test["user_id"]).tolist())
    assert users[0, 0] == users[5, 0]  # a comparison seed changes negatives, not who is tested
    assert users[0, 0] != users[0, 7]
