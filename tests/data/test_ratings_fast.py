"""The vectorised ratings reader equals the strict one, and hands every unusual file to it."""

from __future__ import annotations

import numpy as np
import pytest

from gesr_jax.data import movielens, ratings_fast
from movielens_fixtures import random_log, write_100k, write_csv, write_dat

WRITERS = {"dat": write_dat, "100k": write_100k, "csv": write_csv}


def _strict(root):
    return movielens._read_ratings_strict(movielens.detect_format(root))


def _assert_same(fast, strict):
    assert fast is not None
    for a, b in zip(fast, strict):
        assert a.dtype == b.dtype and np.array_equal(a, b)


@pytest.mark.parametrize("fmt", ["dat", "100k", "csv"])
def test_fast_reader_equals_the_strict_one(tmp_path, fmt, monkeypatch):
    root = WRITERS[fmt](tmp_path / fmt, random_log(num_users=30, seed=1, half_stars=fmt == "csv"))
    files = movielens.detect_format(root)
    # Chunks far smaller than the file: lines straddle chunk boundaries.
    monkeypatch.setattr(ratings_fast, "CHUNK_BYTES", 97)
    fast = ratings_fast.read_ratings_fast(files.ratings, fmt, header=fmt == "csv")
    _assert_same(fast, _strict(root))
    # CRLF line ends, a UTF-8 byte-order mark and no final line end read the same.
    raw = files.ratings.read_bytes()
    files.ratings.write_bytes(ratings_fast.BOM + raw.rstrip(b"\n").replace(b"\n", b"\r\n"))
    _assert_same(ratings_fast.read_ratings_fast(files.ratings, fmt, header=fmt == "csv"), _strict(root))


@pytest.mark.parametrize("fmt", ["dat", "100k"])
def test_a_byte_order_mark_before_the_first_rating_is_skipped(tmp_path, fmt):
    # Issue 24: "user id 'ï»¿196' is not a number" -- the BOM is now stripped as for CSV, on both paths.
    log = random_log(num_users=8, seed=2)
    root = WRITERS[fmt](tmp_path / fmt, log)
    files = movielens.detect_format(root)
    files.ratings.write_bytes(ratings_fast.BOM + files.ratings.read_bytes())
    inter = movielens.load_interactions(root)
    assert np.array_equal(inter.user, log.user) and np.array_equal(inter.timestamp, log.timestamp)
    _assert_same((inter.user, inter.item, inter.rating, inter.timestamp), _strict(root))


@pytest.mark.parametrize(
    "line",
    ["1:: 2::3::4", "1::2::3.0::4", "1::2::3::-4", "1::2::7::4", "0::2::3::4", "1::2::3", "1::2::3::4::5",
     "01234567890::2::3::4", "1::2::3::99999999999"],
)  # fmt: skip
def test_unusual_lines_go_to_the_strict_reader(tmp_path, line):
    root = write_dat(tmp_path / "ml", random_log(num_users=4, seed=3))
    ratings = root / "ratings.dat"
    ratings.write_text(ratings.read_text() + line + "\n")
    assert ratings_fast.read_ratings_fast(ratings, "dat", header=False) is None


def test_a_blank_line_and_a_half_star_in_dat_are_refused_by_the_fast_reader(tmp_path):
    root = write_csv(tmp_path / "csv", random_log(num_users=4, seed=4, half_stars=True))
    ratings = root / "ratings.csv"
    text = ratings.read_text()
    ratings.write_text(text.replace("\n", "\n\n", 3))
    assert ratings_fast.read_ratings_fast(ratings, "csv", header=True) is None
    ratings.write_text(text.replace(".5,", ".50,", 1))
    assert ratings_fast.read_ratings_fast(ratings, "csv", header=True) is None
    dat = write_dat(tmp_path / "dat", random_log(num_users=4, seed=4)) / "ratings.dat"
    dat.write_text(dat.read_text().replace("::", "::", 2).replace("\n", "\n1::2::3.5::4\n", 1))
    assert ratings_fast.read_ratings_fast(dat, "dat", header=False) is None


@pytest.mark.movielens
@pytest.mark.parametrize("name", ["ml-100k", "ml-1m"])
def test_shared_movielens_fast_equals_strict(shared_data, name):
    files = movielens.detect_format(shared_data / name)
    fast = ratings_fast.read_ratings_fast(files.ratings, files.format, header=False)
    _assert_same(fast, _strict(shared_data / name))
