"""Vectorised reading of a MovieLens ratings file: bytes in chunks, numpy digit arithmetic, no per-line Python.

A ratings file (``u.data``, ``ratings*.dat``, ``ratings.csv``) is read in chunks of about
:data:`CHUNK_BYTES` that end at a line end. In each chunk the separators and line ends are found
with one comparison over the bytes; every line must have exactly the fields of its format
(``id SEP id SEP rating SEP timestamp``), ids and timestamps plain decimal digits (at most 10) and
the rating one digit or ``d.d``. The digits are combined column-wise (Horner's rule over the field
positions), so the cost is a few numpy passes per chunk whatever the row count, and memory is the
chunk plus the output columns (about 20 bytes per rating).

This path only accepts the clean files the official formats are. Anything else -- a space, a sign, a
blank line, ``4.50``, a value out of range -- makes :func:`read_ratings_fast` return ``None``; the
caller then runs the strict line-level reader (gesr_jax/data/movielens.py), which names the file and
line of the problem. Values are exactly those of that reader: ``(10 a + b) / 10`` is the correctly
rounded double of ``"a.b"``, as ``float()`` gives.

Why numpy and not pyarrow's CSV reader: pyarrow is not a dependency of this project, and the
MovieLens ``.dat`` separator ``::`` is two bytes, which pyarrow's single-byte delimiter cannot take.
"""

from __future__ import annotations

import pathlib

import numpy as np

from gesr_jax.data.movielens_lines import MAX_TIMESTAMP, count_rows

CHUNK_BYTES = 8 << 20  # bytes per vectorised chunk: temporaries stay ~100 MB
BOM = b"\xef\xbb\xbf"
_MAX_DIGITS = 10  # 2**31 - 1 has 10 digits; longer (zero-padded) numbers go to the strict reader

Columns = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def read_ratings_fast(path: pathlib.Path, fmt: str, header: bool) -> Columns | None:
    """(user int32, movie int32, rating float32, timestamp int64) in file order, or None if any line is unusual.

    ``fmt`` is ``"dat"``, ``"100k"`` or ``"csv"``; with ``header`` the first line is skipped (the caller
    checks it). A leading UTF-8 byte-order mark is skipped; ``\\r\\n`` line ends are accepted.
    """
    sep = {"dat": b":", "100k": b"\t", "csv": b","}[fmt][0]
    fields_per_line = 7 if fmt == "dat" else 4  # "::" makes an empty field between each pair of values
    # Columns at their final size (one cheap newline count first): no list of chunks to concatenate,
    # which would hold every column twice at the end.
    rows = count_rows(path) + 1
    out = (np.empty(rows, np.int32), np.empty(rows, np.int32), np.empty(rows, np.float32), np.empty(rows, np.int64))
    filled = 0
    with open(path, "rb") as f:
        pending = f.read(len(BOM)).removeprefix(BOM)
        skip_header = header
        while True:
            block = f.read(CHUNK_BYTES)
            data = pending + block
            if block:  # parse whole lines only; the partial last line waits for the next block
                cut = data.rfind(b"\n") + 1
                data, pending = data[:cut], data[cut:]
            elif data and not data.endswith(b"\n"):
                data += b"\n"
            if skip_header and data:
                data = data.split(b"\n", 1)[1]
                skip_header = False
            if b"\r" in data:
                data = data.replace(b"\r\n", b"\n")
            if data:
                parsed = _parse_chunk(data, sep, fields_per_line, fmt)
                if parsed is None:
                    return None
                n = parsed[0].size
                for column, values in zip(out, parsed):
                    column[filled : filled + n] = values
                filled += n
            if not block:
                break
    if filled == 0:
        return None  # no rating at all: the strict reader says so
    return tuple(column[:filled] for column in out)  # type: ignore[return-value]


def _parse_chunk(data: bytes, sep: int, fields_per_line: int, fmt: str) -> Columns | None:
    a = np.frombuffer(data, np.uint8)
    is_nl = a == 10
    delim = np.flatnonzero(is_nl | (a == sep))
    lines = int(np.count_nonzero(is_nl))
    if delim.size != lines * fields_per_line:
        return None
    ends = delim.reshape(lines, fields_per_line)
    if not is_nl[ends[:, -1]].all():
        return None
    starts = np.empty_like(ends)
    starts[:, 0] = np.r_[0, ends[:-1, -1] + 1]
    starts[:, 1:] = ends[:, :-1] + 1
    lengths = ends - starts
    if fields_per_line == 7:  # "::": the odd fields must be empty, the values are fields 0, 2, 4, 6
        if lengths[:, 1::2].any():
            return None
        starts, lengths = starts[:, 0::2], lengths[:, 0::2]
    if (lengths < 1).any() or (lengths > _MAX_DIGITS).any():
        return None
    rating_len = lengths[:, 2]
    if not np.isin(rating_len, (1, 3)).all():
        return None
    # Every byte that is neither a separator nor a line end must be a digit, except the rating's '.'.
    non_digit = (a - np.uint8(48)) > 9
    non_digit[delim] = False
    odd = np.flatnonzero(non_digit)
    dots = starts[:, 2][rating_len == 3] + 1
    if odd.size != dots.size or not np.array_equal(odd, dots) or (a[dots] != 46).any():
        return None
    user, item, ts = (_digits(a, starts[:, k], lengths[:, k]) for k in (0, 1, 3))
    first = a[starts[:, 2]].astype(np.int64) - 48
    tenths = np.where(rating_len == 3, a[np.minimum(starts[:, 2] + 2, a.size - 1)].astype(np.int64) - 48, 0)
    rating = np.where(rating_len == 3, (first * 10 + tenths) / 10, first.astype(np.float64))
    ok = (user >= 1) & (user < 2**31) & (item >= 1) & (item < 2**31) & (ts <= MAX_TIMESTAMP)
    if fmt == "csv":
        ok &= (rating >= 0.5) & (rating <= 5) & (rating * 2 == np.round(rating * 2))
    else:
        ok &= (rating_len == 1) & (rating >= 1) & (rating <= 5)
    if not ok.all():
        return None
    return user.astype(np.int32), item.astype(np.int32), rating.astype(np.float32), ts


def _digits(a: np.ndarray, start: np.ndarray, length: np.ndarray) -> np.ndarray:
    """The decimal value of each field (all digits, 1..10 of them), by Horner's rule across positions."""
    value = np.zeros(start.size, np.int64)
    for j in range(int(length.max())):
        take = j < length
        digit = a[np.where(take, start + j, 0)].astype(np.int64) - 48
        value = np.where(take, value * 10 + digit, value)
    return value
