"""Tiny MovieLens-shaped folders written by tests: the three upstream formats, no real data."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

DAT_GENRES = ("Action", "Comedy", "Drama", "Children's", "Sci-Fi")
CSV_GENRES = ("Action", "Comedy", "Drama", "Children", "IMAX")


@dataclasses.dataclass
class Log:
    """The rows a fixture folder holds, in file order."""

    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    timestamp: np.ndarray
    num_items: int
    num_users: int


def random_log(num_users: int = 12, num_items: int = 40, seed: int = 0, half_stars: bool = False) -> Log:
    """Users with 6..30 events each; some share timestamps (same-second bursts) to exercise tie rules."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(1, num_users + 1):
        n = int(rng.integers(6, 31))
        items = rng.choice(np.arange(1, num_items + 1), size=n, replace=False)
        times = 1_000_000_000 + np.sort(rng.integers(0, 50, size=n)) * 3600
        times[n // 2] = times[n // 2 - 1]  # a tie in every user's timeline
        stars = rng.integers(1, 11, size=n) / 2 if half_stars else rng.integers(1, 6, size=n)
        order = rng.permutation(n)  # files are not sorted by time within a user
        rows += [(u, int(items[i]), float(stars[i]), int(times[i])) for i in order]
    arr = np.array(rows, dtype=np.float64)
    return Log(arr[:, 0].astype(int), arr[:, 1].astype(int), arr[:, 2], arr[:, 3].astype(int), num_items, num_users)


def write_dat(root: pathlib.Path, log: Log, users: bool = True, directors: bool = False,
              ratings_name: str = "ratings.dat") -> pathlib.Path:  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    lines = [f"{u}::{i}::{int(r)}::{t}" for u, i, r, t in zip(log.user, log.item, log.rating, log.timestamp)]
    (root / ratings_name).write_text("\n".join(lines) + "\n", encoding="latin-1")
    movies = [
        f"{m}::Movie {m} ({1930 + m % 80})::{DAT_GENRES[m % 5]}|{DAT_GENRES[(m + 1) % 5]}"
        for m in range(1, log.num_items + 1)
    ]
    movies[0] = "1::Amélie (2001)::Comedy|Romance"
    (root / "movies.dat").write_text("\n".join(movies) + "\n", encoding="latin-1")
    if users:
        ages = (1, 18, 25, 35, 45, 50, 56)
        rows = [f"{u}::{'MF'[u % 2]}::{ages[u % 7]}::{u % 21}::5540{u}" for u in range(1, log.num_users + 3)]
        (root / "users.dat").write_text("\n".join(rows) + "\n", encoding="latin-1")
    if directors:
        (root / "extra").mkdir(exist_ok=True)
        names = ["Ann Lee", "Bo Kim", "Ann Lee", "N/A"]
        rows = [
            f"{m}::T::2000::PG::1 Jan 2000::Drama::{names[m % 4]}, Other::W::A::Plot::url"
            for m in range(1, log.num_items + 1)
        ]
        (root / "extra" / "movies_extrainfos.dat").write_text("\r\n".join(rows) + "\r\n", encoding="utf-8")
    return root


def write_100k(root: pathlib.Path, log: Log) -> pathlib.Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = [f"{u}\t{i}\t{int(r)}\t{t}" for u, i, r, t in zip(log.user, log.item, log.rating, log.timestamp)]
    (root / "u.data").write_text("\n".join(lines) + "\n")
    items = []
    for m in range(1, log.num_items + 1):
        flags = ["0"] * 19
        flags[1 + m % 18] = "1"
        date = "" if m == 2 else f"01-Jan-{1950 + m}"
        items.append("|".join([str(m), f"Movie {m}", date, "", "http://x", *flags]))
    (root / "u.item").write_text("\n".join(items) + "\n", encoding="latin-1")
    occupations = ("administrator", "artist", "writer", "none")
    users = [f"{u}|{10 + 4 * u}|{'MF'[u % 2]}|{occupations[u % 4]}|0{u}" for u in range(1, log.num_users + 1)]
    (root / "u.user").write_text("\n".join(users) + "\n")
    return root


def write_csv(root: pathlib.Path, log: Log, tags: bool = True) -> pathlib.Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = ["userId,movieId,rating,timestamp"]
    lines += [f"{u},{i},{r:.1f},{t}" for u, i, r, t in zip(log.user, log.item, log.rating, log.timestamp)]
    (root / "ratings.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    movies = ["movieId,title,genres"]
    movies += [f'{m},"Movie, The {m} ({1990 + m % 30})",{CSV_GENRES[m % 5]}|Drama' for m in range(1, log.num_items + 1)]
    movies[2] = "2,Untitled,(no genres listed)"
    (root / "movies.csv").write_text("\n".join(movies) + "\n", encoding="utf-8")
    if tags:
        (root / "tags.csv").write_text(
            'userId,movieId,tag,timestamp\n1,1,funny,1000000000\n2,3,"dark, slow",1000000001\n'
        )
    return root
