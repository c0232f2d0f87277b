"""MovieLens loaders: the three upstream formats read into one :class:`Interactions` table.

Formats, told apart by the files a folder holds (:func:`detect_format`):

* ``dat``  -- ``ratings*.dat`` + ``movies.dat`` [+ ``users.dat``], ``::``-separated, Latin-1
  (ml-1m, ml-10m; ml-10m has no ``users.dat``).
* ``100k`` -- ``u.data`` (tab) + ``u.item`` [+ ``u.user``] (``|``-separated, Latin-1).
* ``csv``  -- ``ratings.csv`` + ``movies.csv`` [+ ``tags.csv``], UTF-8 with a header row
  (ml-latest-small, ml-20m, ml-25m, ml-32m). No user features; ratings are half stars.

Ids are the public MovieLens ids, unchanged: ``num_items`` is the largest movie id in the
movies file and ``num_users`` the largest user id in the users file (or in the ratings when the
format has none). Optional side data: ``extra/movies_extrainfos.dat`` (MeLU's director file)
adds a director per movie.

Validation: every problem is a :class:`DataFormatError` naming ``file:line``. Ratings are first read
vectorised over bytes (gesr_jax/data/ratings_fast.py), which accepts only clean lines; when it refuses
a file, the strict reader runs: ratings are checked with one regex pass (ids and timestamps must be
plain decimal integers: ``1e2``, ``3.0`` and ``abc``
are refused, not silently read as numbers) and parsed vectorised (``np.loadtxt``); a line that
fails is then explained field by field. Bytes that are not valid in the file's encoding are reported
with the line they are on. A (user, movie, timestamp) triple rated twice is an error naming both
lines, not a skip: a duplicated row usually means files were concatenated twice, and silently
dropping it would hide that. A movie (or user) listed twice in its side file is an error naming both lines.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import pathlib
import re

import numpy as np

from gesr_jax.data import ratings_fast
from gesr_jax.data.movielens_lines import (
    MAX_TIMESTAMP,
    DataFormatError,
    check_duplicates,
    check_rows,
    count_rows,
    int_field,
    list_once,
    numbered_lines,
    problem,
    rating_line,
    read_text,
)

# Union of the genre names every format uses; "Children's" (ml-1m/100k) and "Children" (csv) are one genre.
GENRES: tuple[str, ...] = (
    "Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "IMAX", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
_GENRE_INDEX = {g: i for i, g in enumerate(GENRES)} | {"Children's": GENRES.index("Children")}
# u.item's 19 flag columns, in file order ("unknown" has no column in GENRES).
_GENRES_100K = ("unknown",) + tuple(g for g in GENRES if g != "IMAX")
# ml-100k occupations (u.occupation order); ml-1m uses codes 0..20 instead.
OCCUPATIONS_100K: tuple[str, ...] = (
    "administrator", "artist", "doctor", "educator", "engineer", "entertainment", "executive", "healthcare",
    "homemaker", "lawyer", "librarian", "marketing", "none", "other", "programmer", "retired", "salesman",
    "scientist", "student", "technician", "writer",
)  # fmt: skip
AGE_CODES_1M: tuple[int, ...] = (1, 18, 25, 35, 45, 50, 56)  # users.dat age buckets; 100k ages map onto them
FORMATS = ("dat", "100k", "csv")
DIRECTOR_FILE = pathlib.Path("extra") / "movies_extrainfos.dat"


@dataclasses.dataclass(frozen=True)
class MovieLensFiles:
    """The files of one MovieLens folder, as found by :func:`detect_format`."""

    format: str  # "dat", "100k" or "csv"
    root: pathlib.Path
    ratings: pathlib.Path
    movies: pathlib.Path
    users: pathlib.Path | None  # None when the format/folder has no user file
    tags: pathlib.Path | None  # csv only
    directors: pathlib.Path | None  # extra/movies_extrainfos.dat when present

    def all_files(self) -> list[pathlib.Path]:
        return [p for p in (self.ratings, self.movies, self.users, self.tags, self.directors) if p is not None]


@dataclasses.dataclass(frozen=True)
class Interactions:
    """One MovieLens dataset in memory: a rating log plus item and user side features.

    Rows of the log keep file order. Per-item arrays are indexed by movie id (row 0 unused),
    per-user arrays by user id. Encoded user features use 0 for "unknown".
    """

    files: MovieLensFiles
    user: np.ndarray  # [E] int32 user ids
    item: np.ndarray  # [E] int32 movie ids
    rating: np.ndarray  # [E] float32 stars (1..5, or 0.5..5 in half steps for csv)
    timestamp: np.ndarray  # [E] int64 unix seconds
    num_users: int
    num_items: int
    item_known: np.ndarray  # [num_items+1] bool: the id is listed in the movies file
    item_genres: np.ndarray  # [num_items+1, len(GENRES)] bool, genres in GENRES order
    item_primary_genre: np.ndarray  # [num_items+1] int32: 1 + GENRES index of the first listed genre; 0 = none
    item_year: np.ndarray  # [num_items+1] int32 release year; 0 = unknown
    item_director: np.ndarray | None  # [num_items+1] int32 rank of the director by movie count (1 = most); 0 = none
    director_names: tuple[str, ...]  # director_names[r - 1] is the director of rank r
    user_features: dict[str, np.ndarray]  # name -> [num_users+1] int32 codes (gender, age, occupation)
    num_tags: int  # rows of tags.csv (csv format), else 0

    @property
    def format(self) -> str:
        return self.files.format

    def genres(self, item: int) -> list[str]:
        """The genres of a movie as a list of names."""
        return [GENRES[i] for i in np.flatnonzero(self.item_genres[item])]

    def seen(self) -> dict[str, int]:
        """What the rating log actually holds: distinct users, ratings, and the lowest/highest user id.

        A folder may hold part of a dataset (e.g. ../shared/data/ml-1m: users 1-2999 of ML-1M's 6040), so
        tables name these counts, not the dataset's nominal size.
        """
        users = np.unique(self.user)
        return {
            "users": int(users.size),
            "ratings": int(self.user.size),
            "user_id_min": int(users[0]) if users.size else 0,
            "user_id_max": int(users[-1]) if users.size else 0,
        }


def detect_format(path: str | pathlib.Path) -> MovieLensFiles:
    """Find which MovieLens format ``path`` holds; raise :class:`DataFormatError` saying what was expected."""
    if not str(path):
        raise DataFormatError(
            "data.movielens.path is empty: set it to a MovieLens folder, e.g. --set data.movielens.path=DIR"
        )
    root = pathlib.Path(path).expanduser()
    if not root.is_dir():
        raise DataFormatError(f"MovieLens folder {root} does not exist or is not a folder")
    def optional(name: str | pathlib.Path) -> pathlib.Path | None:
        return root / name if (root / name).is_file() else None

    if (root / "u.data").is_file():
        _require(root, "u.item", "100k")
        return MovieLensFiles(
            "100k", root, root / "u.data", root / "u.item", optional("u.user"), None, optional(DIRECTOR_FILE)
        )
    dat = sorted(root.glob("ratings*.dat"))
    if dat:
        if len(dat) > 1 and (root / "ratings.dat") in dat:
            dat = [root / "ratings.dat"]
        if len(dat) > 1:
            raise DataFormatError(f"{root} holds several ratings files {[p.name for p in dat]}; keep exactly one")
        _require(root, "movies.dat", "dat")
        return MovieLensFiles(
            "dat", root, dat[0], root / "movies.dat", optional("users.dat"), None, optional(DIRECTOR_FILE)
        )
    if (root / "ratings.csv").is_file():
        _require(root, "movies.csv", "csv")
        return MovieLensFiles(
            "csv", root, root / "ratings.csv", root / "movies.csv", None, optional("tags.csv"), optional(DIRECTOR_FILE)
        )
    inner = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != "extra")
    hint = f"; it has subfolders {inner} - point data.movielens.path at one of them" if inner else ""
    raise DataFormatError(
        f"{root} is not a MovieLens folder: expected ratings*.dat + movies.dat (ml-1m, ml-10m), "
        f"u.data + u.item (ml-100k) or ratings.csv + movies.csv (ml-latest-small, ml-20m/25m/32m){hint}"
    )


def _require(root: pathlib.Path, name: str, fmt: str) -> None:
    if not (root / name).is_file():
        raise DataFormatError(f"{root} looks like the {fmt!r} MovieLens format but has no {name}")


def load_interactions(path: str | pathlib.Path) -> Interactions:
    """Parse every file of a MovieLens folder into an :class:`Interactions` table."""
    files = detect_format(path)
    movies = _read_movies(files)
    num_items = max(movies)
    item_known = np.zeros(num_items + 1, bool)
    item_genres = np.zeros((num_items + 1, len(GENRES)), bool)
    item_primary = np.zeros(num_items + 1, np.int32)
    item_year = np.zeros(num_items + 1, np.int32)
    for movie, (genres, year) in movies.items():
        item_known[movie] = True
        item_genres[movie, genres] = True
        item_primary[movie] = genres[0] + 1 if genres else 0
        item_year[movie] = year
    item_director, director_names = None, ()
    if files.directors is not None:
        item_director, director_names = _read_directors(files.directors, num_items)
    user_features = _read_users(files) if files.users is not None else {}
    user, item, rating, ts = _read_ratings(files)
    header = 1 if files.format == "csv" else 0
    listed_item = item_known[np.minimum(item, num_items)] & (item <= num_items)
    check_rows(files.ratings, header, listed_item, f"movie id not listed in {files.movies.name}")
    num_users = int(user.max()) if user.size else 0
    if user_features:
        listed = next(iter(user_features.values())) > 0
        known = (user < listed.size) & listed[np.minimum(user, listed.size - 1)]
        check_rows(files.ratings, header, known, f"user id not listed in {files.users.name}")
        num_users = listed.size - 1
    num_tags = count_rows(files.tags) - 1 if files.tags is not None else 0
    return Interactions(
        files, user, item, rating, ts, num_users, num_items, item_known, item_genres, item_primary, item_year,
        item_director, director_names, user_features, max(num_tags, 0),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- ratings


def _read_ratings(files: MovieLensFiles) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The ratings columns: vectorised over bytes (ratings_fast.py); the strict reader names a bad line."""
    path, fmt = files.ratings, files.format
    if fmt != "csv" or _csv_header(path) == _CSV_HEADER:
        fast = ratings_fast.read_ratings_fast(path, fmt, header=fmt == "csv")
        if fast is not None:
            check_duplicates(path, int(fmt == "csv"), fast[0], fast[1], fast[3])
            return fast
    return _read_ratings_strict(files)


_CSV_HEADER = ["userId", "movieId", "rating", "timestamp"]


def _csv_header(path: pathlib.Path) -> list[str] | None:
    """The first four names of a ratings.csv header, or None when the first line cannot be read as UTF-8."""
    try:
        with open(path, "rb") as f:
            first = f.readline().removeprefix(ratings_fast.BOM).decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return first.strip().split(",")[:4]


def _read_ratings_strict(files: MovieLensFiles) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Line-level reading that explains the first bad line (only run when the vectorised reader refuses)."""
    path, fmt = files.ratings, files.format
    text = read_text(path, "utf-8" if fmt == "csv" else "latin-1")
    header = int(fmt == "csv")
    if header:
        first, _, text = text.partition("\n")
        if first.strip().split(",")[:4] != _CSV_HEADER:
            raise DataFormatError(f"{path}:1: expected the header 'userId,movieId,rating,timestamp', got {first!r}")
    sep = {"dat": "::", "100k": "\t", "csv": ","}[fmt]
    if not text.strip():
        raise DataFormatError(f"{path} holds no ratings")
    blank = re.search(r"(^|\n)[ \t]*\n(?=.)", text, flags=re.S)
    if blank is not None:
        line = text.count("\n", 0, blank.end() - 1) + 1 + header
        raise DataFormatError(f"{path}:{line}: empty line inside the ratings")
    # One C-speed regex pass over the text: np.loadtxt alone would read "1e2" as 100 and "3.0" as 3.
    bad = rating_line(sep).search(text)
    if bad is not None:
        line = text[bad.start() :].split("\n", 1)[0]
        reason = problem(line, sep) or f"malformed ratings line {line!r}"
        raise DataFormatError(f"{path}:{text.count(chr(10), 0, bad.start()) + 1 + header}: {reason}")
    body = text.replace("::", "\t") if fmt == "dat" else text
    try:
        table = np.loadtxt(io.StringIO(body), delimiter="\t" if fmt != "csv" else ",", dtype=np.float64, ndmin=2)
    except ValueError as err:  # a rating that is not a number: find its line (slow, only on failure)
        lines = enumerate(text.split("\n"), start=1 + header)
        found = next((f"{path}:{n}: {p}" for n, line in lines if line and (p := problem(line, sep))), None)
        raise DataFormatError(found or f"{path}: could not parse the ratings ({err})") from None
    user, item, rating, ts = table.T
    for col, name in ((user, "user id"), (item, "movie id")):
        check_rows(path, header, (col >= 1) & (col < 2**31), f"{name} is not a positive integer")
    ts_ok = (ts >= 0) & (ts <= MAX_TIMESTAMP)
    check_rows(path, header, ts_ok, f"bad timestamp (expected integer unix seconds in [0, {MAX_TIMESTAMP}])")
    if fmt == "csv":
        valid = (rating >= 0.5) & (rating <= 5) & (rating * 2 == np.round(rating * 2))
        check_rows(path, header, valid, "rating is not a half star in 0.5..5")
    else:
        check_rows(path, header, np.isin(rating, [1, 2, 3, 4, 5]), "rating is not an integer in 1..5")
    out = user.astype(np.int32), item.astype(np.int32), rating.astype(np.float32), ts.astype(np.int64)
    check_duplicates(path, header, out[0], out[1], out[3])
    return out


# ---------------------------------------------------------------------------------------------- side files


def _read_movies(files: MovieLensFiles) -> dict[int, tuple[list[int], int]]:
    """movie id -> (GENRES indices in listed order, release year or 0)."""
    path, fmt = files.movies, files.format
    movies: dict[int, tuple[list[int], int]] = {}
    listed_on: dict[int, int] = {}  # movie id -> line, to name both lines of a duplicate
    if fmt == "csv":
        reader = csv.reader(io.StringIO(read_text(path, "utf-8"), newline=""))
        numbered = []
        try:
            for row in reader:
                numbered.append((reader.line_num, row))
        except csv.Error as err:
            raise DataFormatError(f"{path}:{reader.line_num + 1}: {err}") from None
        if not numbered or numbered[0][1][:3] != ["movieId", "title", "genres"]:
            raise DataFormatError(f"{path}:1: expected the header 'movieId,title,genres'")
        numbered = [(n, r) for n, r in numbered[1:] if r]
    else:
        numbered = list(numbered_lines(path, "latin-1", "::" if fmt == "dat" else "|"))
    expected = 3 if fmt != "100k" else 24
    for number, fields in numbered:
        if len(fields) != expected:
            raise DataFormatError(f"{path}:{number}: expected {expected} fields, found {len(fields)}")
        movie = int_field(path, number, fields[0], "movie id")
        list_once(path, listed_on, movie, number, "movie id")
        if fmt == "100k":
            flags = fields[5:]
            if any(v not in ("0", "1") for v in flags):
                raise DataFormatError(f"{path}:{number}: genre flags must be 0 or 1")
            names = [_GENRES_100K[i] for i, v in enumerate(flags) if v == "1"]
            date = fields[2].strip()
            year = int(date[-4:]) if re.fullmatch(r".*\d{4}", date) else 0
        else:
            names = [] if fields[2] == "(no genres listed)" else fields[2].split("|")
            found = re.findall(r"\((\d{4})\)", fields[1])
            year = int(found[-1]) if found else 0
        movies[movie] = ([_GENRE_INDEX[g] for g in names if g in _GENRE_INDEX], year)
    if not movies:
        raise DataFormatError(f"{path} lists no movies")
    return movies


def _read_directors(path: pathlib.Path, num_items: int) -> tuple[np.ndarray, tuple[str, ...]]:
    """Director rank per movie (1 = director with most movies; ties by name); the first of several credited."""
    by_movie: dict[int, str] = {}
    for number, fields in numbered_lines(path, "utf-8", "::"):
        if len(fields) != 11:
            raise DataFormatError(f"{path}:{number}: expected 11 fields separated by '::', found {len(fields)}")
        movie = int_field(path, number, fields[0], "movie id")
        name = fields[6].split(",")[0].strip()
        if name and name != "N/A" and movie <= num_items:
            by_movie[movie] = name
    counts = collections.Counter(by_movie.values())
    names = tuple(sorted(counts, key=lambda n: (-counts[n], n)))
    rank = {n: r for r, n in enumerate(names, start=1)}
    director = np.zeros(num_items + 1, np.int32)
    for movie, name in by_movie.items():
        director[movie] = rank[name]
    return director, names


def _read_users(files: MovieLensFiles) -> dict[str, np.ndarray]:
    """gender (1 M, 2 F), age (1..7, users.dat buckets) and occupation (1..21) codes per user id."""
    path = files.users
    assert path is not None
    sep, n_fields = ("::", 5) if files.format == "dat" else ("|", 5)
    rows: list[tuple[int, int, int, int]] = []
    listed_on: dict[int, int] = {}
    for number, fields in numbered_lines(path, "latin-1", sep):
        if len(fields) != n_fields:
            raise DataFormatError(
                f"{path}:{number}: expected {n_fields} fields separated by {sep!r}, found {len(fields)}"
            )
        user = int_field(path, number, fields[0], "user id")
        list_once(path, listed_on, user, number, "user id")
        if files.format == "dat":
            gender, age, occ = fields[1], int_field(path, number, fields[2], "age"), fields[3]
            if age not in AGE_CODES_1M:
                raise DataFormatError(f"{path}:{number}: age code {age} is not one of {AGE_CODES_1M}")
            age_code = AGE_CODES_1M.index(age) + 1
            occ_code = int_field(path, number, occ, "occupation") + 1
            if not 1 <= occ_code <= 21:
                raise DataFormatError(f"{path}:{number}: occupation code {occ} is not in 0..20")
        else:
            age, gender, occ = int_field(path, number, fields[1], "age"), fields[2], fields[3]
            age_code = int(np.searchsorted(AGE_CODES_1M, age, side="right"))
            if occ not in OCCUPATIONS_100K:
                raise DataFormatError(f"{path}:{number}: unknown occupation {occ!r}")
            occ_code = OCCUPATIONS_100K.index(occ) + 1
        if gender not in ("M", "F"):
            raise DataFormatError(f"{path}:{number}: gender {gender!r} is not M or F")
        rows.append((user, 1 if gender == "M" else 2, max(age_code, 1), occ_code))
    if not rows:
        raise DataFormatError(f"{path} lists no users")
    table = np.asarray(rows, np.int32)
    out = {}
    for col, name in enumerate(("gender", "age", "occupation"), start=1):
        arr = np.zeros(int(table[:, 0].max()) + 1, np.int32)
        arr[table[:, 0]] = table[:, col]
        out[name] = arr
    return out


def read_max_user_id(files: MovieLensFiles) -> int:
    """Largest user id of the users file without parsing the ratings (``files.users`` must exist)."""
    assert files.users is not None
    return int(next(iter(_read_users(files).values())).size - 1)


def read_max_movie_id(files: MovieLensFiles) -> int:
    """Largest movie id listed in the movies file (the item vocabulary, ids unchanged)."""
    return max(_read_movies(files))
