"""global_time_user_holdout (issue 22 item 2): valid and test are disjoint halves of the post-cut-2 users."""

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
