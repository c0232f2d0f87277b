"""gesr_jax/sidecar.py: the sidecar's size limit leaves out only the per-test-user sums, and says so."""

import json

from gesr_jax import sidecar


def _rows(users: int) -> list[dict]:
    run = {"seed": 0, "valid": {"consume/ne": 0.7}, "test": {"consume/ne": 0.8},
           "test_users": {"consume": {"candidates": list(range(users)), "positives": [1] * users}}}  # fmt: skip
    return [{"label": "two-tower", "config": "synthetic_base_two_tower", "overrides": [], "runs": [run]}]


def test_a_small_sidecar_keeps_the_per_user_sums(tmp_path):
    data = json.loads(sidecar.write(tmp_path / "s.json", _rows(10)).read_text())
    assert "left_out" not in data
    assert data["rows"][0]["runs"][0]["test_users"]["consume"]["candidates"] == list(range(10))
    # lists of numbers on one line each
    assert "[0,1,2,3,4,5,6,7,8,9]" in (tmp_path / "s.json").read_text()


def test_an_oversized_sidecar_leaves_out_the_per_user_sums_and_says_so(tmp_path):
    path = sidecar.write(tmp_path / "s.json", _rows(5000), max_bytes=20_000)
    data = json.loads(path.read_text())
    assert path.stat().st_size <= 20_000
    assert "test_users" in data["left_out"] and "over 0.02 MB" in data["left_out"]
    run = data["rows"][0]["runs"][0]
    assert "test_users" not in run
    assert run["test"] == {"consume/ne": 0.8} and run["valid"] == {"consume/ne": 0.7}


def test_write_json_drops_the_bulky_entries_at_any_depth_only_when_over_the_limit(tmp_path):
    data = {"k": 200, "per_seed": [{"seed": s, "GESR": {"hr@10": 0.05, "users": {"user": list(range(3000))}}}
                                   for s in range(2)]}  # fmt: skip
    kept = json.loads(sidecar.write_json(tmp_path / "a.json", data, "users").read_text())
    assert kept == data
    small = json.loads(sidecar.write_json(tmp_path / "b.json", data, "users", max_bytes=5_000).read_text())
    assert small["left_out"].startswith("users (the per-test-user sums)")
    assert small["per_seed"] == [{"seed": s, "GESR": {"hr@10": 0.05}} for s in range(2)] and small["k"] == 200
