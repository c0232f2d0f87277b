"""Strict line-level parsing of MovieLens files: every problem names the file and line it is on.

The loaders in :mod:`gesr_jax.data.movielens` build on these helpers: :func:`read_text` decodes a
file (reporting undecodable bytes with their line), :func:`numbered_lines` splits a side file into
numbered fields, :func:`int_field` and :func:`list_once` check one field or listing, and
:func:`rating_line` / :func:`problem` find and explain a malformed ratings line. The row checks
(:func:`check_rows`, :func:`check_duplicates`) turn a failed vectorised test back into ``file:line``.
"""

from __future__ import annotations

import functools
import pathlib
import re
from collections.abc import Iterator

import numpy as np

MAX_TIMESTAMP = 2**31 - 1  # batches carry times as int32

ID = r"[ ]*\d+[ ]*"  # plain decimal digits: no sign, exponent, decimal point or underscore
TIMESTAMP = r"[ ]*-?\d+[ ]*"  # the sign is let through so the range check can say "bad timestamp"


class DataFormatError(ValueError):
    """A MovieLens folder or file is missing, unknown or malformed; the message names file and line."""


def read_text(path: pathlib.Path, encoding: str) -> str:
    """The file as text with ``\n`` line ends; undecodable bytes are reported with their line number."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataFormatError(f"cannot read {path}: {err.strerror or err}") from None
    data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark, whatever the encoding read
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataFormatError(
            f"{path}:{line}: byte 0x{data[err.start]:02x} (byte {column} of the line) is not valid {encoding}; "
            f"this MovieLens file is expected to be {encoding}-encoded"
        ) from None
    return text.removeprefix("\ufeff").replace("\r\n", "\n")


def numbered_lines(path: pathlib.Path, encoding: str, sep: str) -> Iterator[tuple[int, list[str]]]:
    """``(line number, fields)`` of every non-blank line of a side file."""
    for number, line in enumerate(read_text(path, encoding).split("\n"), start=1):
        if line.strip():
            yield number, line.split(sep)


def list_once(path: pathlib.Path, seen: dict[int, int], key: int, number: int, what: str) -> None:
    """Note that ``key`` is listed on line ``number``; a second listing is an error naming both lines."""
    if key in seen:
        raise DataFormatError(f"{path}:{number}: {what} {key} is listed twice (lines {seen[key]} and {number})")
    seen[key] = number


def int_field(path: pathlib.Path, number: int, value: str, name: str) -> int:
    # int() alone would also take "1_000", "+3" and non-ASCII digits; the files only use plain decimals.
    if not re.fullmatch(r"[ ]*-?\d+[ ]*", value, re.ASCII):
        raise DataFormatError(f"{path}:{number}: {name} {value!r} is not an integer")
    out = int(value)
    if name.endswith("id") and out < 1:
        raise DataFormatError(f"{path}:{number}: {name} {out} must be >= 1")
    return out


@functools.cache
def rating_line(sep: str) -> re.Pattern[str]:
    """Matches at the start of the first non-empty line that is not ``id SEP id SEP rating SEP timestamp``."""
    s, rating = re.escape(sep), rf"[^{re.escape(sep[0])}\n]*"
    return re.compile(rf"^(?!{ID}{s}{ID}{s}{rating}{s}{TIMESTAMP}$)(?=.)", re.M | re.ASCII)


def problem(line: str, sep: str) -> str | None:
    """What is wrong with one ratings line, or None when its fields look right."""
    fields = line.split(sep)
    if len(fields) != 4:
        return f"expected 4 fields separated by {sep!r}, found {len(fields)}: {line!r}"
    for name, value in zip(("user id", "movie id", "rating", "timestamp"), fields):
        try:
            float(value)
        except ValueError:
            return f"{name} {value!r} is not a number"
    for name, value in (("user id", fields[0]), ("movie id", fields[1])):
        if not re.fullmatch(ID, value, re.ASCII):
            return f"{name} is not a positive integer: {value!r}"
    if not re.fullmatch(TIMESTAMP, fields[3], re.ASCII):
        return f"bad timestamp {fields[3]!r} (expected integer unix seconds in [0, {MAX_TIMESTAMP}])"
    return None


def check_rows(path: pathlib.Path, header: int, ok: np.ndarray, what: str) -> None:
    """Raise naming the line of the first row where ``ok`` is False (``header`` lines precede row 0)."""
    if not np.all(ok):
        row = int(np.flatnonzero(~ok)[0])
        raise DataFormatError(f"{path}:{row + 1 + header}: {what}")


def count_rows(path: pathlib.Path) -> int:
    """Number of newline bytes in the file, read in 1 MiB chunks."""
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def check_duplicates(path: pathlib.Path, header: int, user: np.ndarray, item: np.ndarray, ts: np.ndarray) -> None:
    """Raise naming both lines of the first (user, movie, timestamp) rated twice (first by its second line)."""
    if user.size and int(user.max()) < 2**31 and int(item.max()) < 2**31 and int(item.min()) >= 0:
        # One sort of a (user, movie) key; only when some pair repeats is the exact 4-key sort needed.
        pair = np.sort(user.astype(np.int64) << 31 | item.astype(np.int64))
        if not (pair[1:] == pair[:-1]).any():
            return
    order = np.lexsort((np.arange(user.size), ts, item, user))  # row index last: ties keep file order
    u, i, t = user[order], item[order], ts[order]
    same = (u[1:] == u[:-1]) & (i[1:] == i[:-1]) & (t[1:] == t[:-1])
    if same.any():
        later = order[1:][same]
        k = int(np.argmin(later))  # the duplicate that appears first in the file
        first, second = int(order[:-1][same][k]), int(later[k])
        raise DataFormatError(
            f"{path}:{second + 1 + header}: duplicate rating: user {user[second]} rated movie {item[second]} at "
            f"timestamp {ts[second]} already on line {first + 1 + header}"
        )
