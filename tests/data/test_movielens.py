"""MovieLens loaders: the three formats into one table, and clear errors on bad input."""

from __future__ import annotations

import numpy as np
import pytest

from gesr_jax.data import movielens
from gesr_jax.data.movielens import DataFormatError, detect_format, load_interactions
from movielens_fixtures import random_log, write_100k, write_csv, write_dat


def _as_set(user, item, rating, ts):
    return set(zip(user.tolist(), item.tolist(), np.asarray(rating, float).tolist(), ts.tolist()))


@pytest.mark.parametrize("fmt", ["dat", "100k", "csv"])
def test_formats_load_the_same_log(tmp_path, fmt):
    log = random_log(half_stars=fmt == "csv")
    writer = {"dat": write_dat, "100k": write_100k, "csv": write_csv}[fmt]
    inter = load_interactions(writer(tmp_path / fmt, log))
    assert inter.format == fmt
    assert _as_set(inter.user, inter.item, inter.rating, inter.timestamp) == _as_set(
        log.user, log.item, log.rating, log.timestamp
    )
    assert inter.num_items == log.num_items
    assert inter.item_known[1:].all() and not inter.item_known[0]
    assert inter.timestamp.dtype == np.int64 and inter.user.dtype == np.int32


def test_dat_side_features(tmp_path):
    inter = load_interactions(write_dat(tmp_path, random_log(), directors=True))
    assert inter.genres(1) == ["Comedy", "Romance"]  # Latin-1 title parsed, genres kept as a list
    assert inter.genres(3) == ["Children", "Sci-Fi"]  # "Children's" folds into the shared vocabulary
    assert inter.item_primary_genre[3] == movielens.GENRES.index("Children") + 1
    assert inter.item_year[1] == 2001 and inter.item_year[5] == 1935
    # Director: first credited name; "Ann Lee" directs twice as many movies so ranks first; N/A is missing.
    assert inter.director_names[:2] == ("Ann Lee", "Bo Kim")
    assert inter.item_director[2] == 1 and inter.item_director[1] == 2 and inter.item_director[3] == 0
    assert inter.num_users == 14  # users.dat lists 2 users without ratings
    assert inter.user_features["gender"][1] == 2 and inter.user_features["gender"][2] == 1
    assert inter.user_features["age"][1] == 2  # code 18 -> second bucket
    assert inter.user_features["occupation"][1] == 2  # code 1 -> id 2


def test_100k_and_csv_side_features(tmp_path):
    inter = load_interactions(write_100k(tmp_path / "a", random_log()))
    assert inter.item_year[2] == 0 and inter.item_year[3] == 1953
    assert inter.user_features["age"][1] == 1  # 14 years -> "under 18"
    assert inter.user_features["age"][4] == 3  # 26 years -> 25-34
    assert inter.user_features["occupation"][2] == movielens.OCCUPATIONS_100K.index("writer") + 1
    csv = load_interactions(write_csv(tmp_path / "b", random_log(half_stars=True)))
    assert csv.user_features == {} and csv.num_tags == 2
    assert csv.genres(2) == [] and csv.item_primary_genre[2] == 0
    assert csv.genres(4) == ["Drama", "IMAX"] and csv.item_year[4] == 1994  # quoted title with a comma


def test_ratings_file_found_by_pattern(tmp_path):
    write_dat(tmp_path, random_log(), ratings_name="ratings_partial_users_1-12.dat")
    assert detect_format(tmp_path).ratings.name == "ratings_partial_users_1-12.dat"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("3::17::4", "expected 4 fields"),
        ("x3::17::4::1000000000", "'x3' is not a number"),
        ("3::17::4::-5", "bad timestamp"),
        ("3::17::4::99999999999", "bad timestamp"),
        ("3::17.5::4::1000000000", "movie id is not a positive integer"),
        ("3::17::9::1000000000", "rating is not an integer in 1..5"),
        ("3::17::abc::1000000000", "rating 'abc' is not a number"),
        ("3::17::4::1000000000.5", "bad timestamp '1000000000.5'"),
        ("3::999::4::1000000000", "movie id not listed in movies.dat"),
        ("99::17::4::1000000000", "user id not listed in users.dat"),
        ("", "empty line"),
    ],
)
def test_malformed_rating_names_file_and_line(tmp_path, line, message):
    root = write_dat(tmp_path, random_log())
    path = root / "ratings.dat"
    lines = path.read_text().splitlines()
    lines.insert(6, line)  # becomes line 7
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=rf"ratings\.dat:7: .*{message}"):
        load_interactions(root)


def test_malformed_csv_and_side_files(tmp_path):
    root = write_csv(tmp_path / "c", random_log(half_stars=True))
    path = root / "ratings.csv"
    lines = path.read_text().splitlines()
    lines[4] = "1,2,3.3,1000000000"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=r"ratings\.csv:5: rating is not a half star"):
        load_interactions(root)
    path.write_text("user,movie,rating,time\n")
    with pytest.raises(DataFormatError, match=r"ratings\.csv:1: expected the header"):
        load_interactions(root)
    root = write_100k(tmp_path / "k", random_log())
    user_file = root / "u.user"
    user_file.write_text(user_file.read_text().replace("|writer|", "|astronaut|"))
    with pytest.raises(DataFormatError, match=r"u\.user:2: unknown occupation 'astronaut'"):
        load_interactions(root)
    root = write_dat(tmp_path / "d", random_log())
    (root / "movies.dat").write_text("1::A (1999)::Drama\n2::B (1999)\n")
    with pytest.raises(DataFormatError, match=r"movies\.dat:2: expected 3 fields"):
        load_interactions(root)


def test_missing_and_unknown_folders(tmp_path):
    with pytest.raises(DataFormatError, match="data.movielens.path is empty"):
        detect_format("")
    with pytest.raises(DataFormatError, match="does not exist"):
        detect_format(tmp_path / "nope")
    with pytest.raises(DataFormatError, match=r"not a MovieLens folder: expected ratings\*\.dat"):
        detect_format(tmp_path)
    (tmp_path / "ml-x").mkdir()
    with pytest.raises(DataFormatError, match=r"subfolders \['ml-x'\]"):
        detect_format(tmp_path)
    (tmp_path / "ml-x" / "u.data").write_text("1\t1\t1\t1\n")
    with pytest.raises(DataFormatError, match="'100k' MovieLens format but has no u.item"):
        detect_format(tmp_path / "ml-x")
    empty = write_dat(tmp_path / "empty", random_log())
    (empty / "ratings.dat").write_text("")
    with pytest.raises(DataFormatError, match="holds no ratings"):
        load_interactions(empty)


def _insert_line(path, index, line, encoding="latin-1"):
    lines = path.read_text(encoding=encoding).splitlines()
    lines.insert(index, line)
    path.write_text("\n".join(lines) + "\n", encoding=encoding)


@pytest.mark.parametrize("value", ["1e2", "3.0", "abc", "+3", "0x1f"])
@pytest.mark.parametrize("column", ["user id", "movie id"])
def test_non_integer_ids_are_refused_not_read_as_numbers(tmp_path, value, column):
    root = write_csv(tmp_path, random_log(half_stars=True))
    line = f"{value},17,4.0,1000000000" if column == "user id" else f"3,{value},4.0,1000000000"
    _insert_line(root / "ratings.csv", 5, line, encoding="utf-8")  # line 6 (after the header)
    problem = "is not a number" if value in ("abc", "0x1f") else "is not a positive integer"
    with pytest.raises(DataFormatError, match=rf"ratings\.csv:6: {column} .*{problem}.*") as info:
        load_interactions(root)
    assert repr(value) in str(info.value)


def test_non_integer_timestamps_are_refused(tmp_path):
    root = write_dat(tmp_path, random_log())
    _insert_line(root / "ratings.dat", 2, "3::17::4::1e9")
    with pytest.raises(DataFormatError, match=r"ratings\.dat:3: bad timestamp '1e9'"):
        load_interactions(root)


def test_duplicate_ratings_name_both_lines(tmp_path):
    log = random_log()
    root = write_dat(tmp_path, log)
    path = root / "ratings.dat"
    lines = path.read_text().splitlines()
    lines.insert(20, lines[3])  # line 4 again as line 21
    path.write_text("\n".join(lines) + "\n")
    u, i, _, t = lines[3].split("::")
    expected = rf"ratings\.dat:21: duplicate rating: user {u} rated movie {i} at timestamp {t} already on line 4"
    with pytest.raises(DataFormatError, match=expected):
        load_interactions(root)
    # The same user and movie at another time is a re-rating, not a duplicate.
    lines[20] = f"{u}::{i}::3::{int(t) + 1}"
    path.write_text("\n".join(lines) + "\n")
    assert load_interactions(root).user.size == log.user.size + 1


@pytest.mark.parametrize(
    ("writer", "name", "header"),
    [(write_dat, "movies.dat", 0), (write_100k, "u.item", 0), (write_csv, "movies.csv", 1)],
)
def test_a_movie_listed_twice_names_both_lines(tmp_path, writer, name, header):
    root = writer(tmp_path, random_log(half_stars=writer is write_csv))
    path = root / name
    lines = path.read_text(encoding="latin-1").splitlines()
    lines.append(lines[header + 2])  # movie 3 again, at the end
    path.write_text("\n".join(lines) + "\n", encoding="latin-1")
    expected = rf"{name}:{len(lines)}: movie id 3 is listed twice \(lines {header + 3} and {len(lines)}\)"
    with pytest.raises(DataFormatError, match=expected):
        load_interactions(root)


def test_a_user_listed_twice_names_both_lines(tmp_path):
    root = write_dat(tmp_path, random_log())
    path = root / "users.dat"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines, lines[0]]) + "\n")
    with pytest.raises(DataFormatError, match=rf"users\.dat:{len(lines) + 1}: user id 1 is listed twice \(lines 1 and"):
        load_interactions(root)


def test_bytes_invalid_in_the_encoding_name_file_and_line(tmp_path):
    root = write_csv(tmp_path / "c", random_log(half_stars=True))
    path = root / "ratings.csv"
    data = path.read_bytes().split(b"\n")
    data[7] = data[7][:3] + b"\xff" + data[7][3:]
    path.write_bytes(b"\n".join(data))
    expected = r"ratings\.csv:8: byte 0xff \(byte 4 of the line\) is not valid utf-8; .*expected to be utf-8"
    with pytest.raises(DataFormatError, match=expected):
        load_interactions(root)
    root = write_csv(tmp_path / "m", random_log(half_stars=True))
    movies = root / "movies.csv"
    movies.write_bytes(movies.read_bytes().replace(b"Movie, The 5 ", "Amélie 5 ".encode("latin-1")))
    with pytest.raises(DataFormatError, match=r"movies\.csv:6: byte 0xe9 .*not valid utf-8"):
        load_interactions(root)
    # A UTF-8 byte-order mark (Excel writes one) is not an error.
    path = root / "ratings.csv"
    movies.write_text(movies.read_bytes().decode("latin-1"), encoding="utf-8")
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert load_interactions(root).format == "csv"


def test_side_file_integers_are_strict(tmp_path):
    root = write_dat(tmp_path, random_log())
    path = root / "movies.dat"
    path.write_text(path.read_text(encoding="latin-1").replace("2::Movie 2", "2e0::Movie 2"), encoding="latin-1")
    with pytest.raises(DataFormatError, match=r"movies\.dat:2: movie id '2e0' is not an integer"):
        load_interactions(root)
