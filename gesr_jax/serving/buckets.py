"""Static shapes for serving: request-batch buckets and candidate-chunk buckets.

Every jitted (or exported) serving function is compiled for one request-batch size R and, for scoring, one
chunk size C. A call with r requests runs in batches of the smallest R >= r (padded with empty rows; more
requests than the largest R are split into several batches), and c candidates run as a plan of chunks
whose sizes are all buckets, so after a warm-up over the buckets nothing ever compiles again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

DEFAULT_REQUEST_SIZES: tuple[int, ...] = (1, 4, 16)
DEFAULT_CHUNK_SIZES: tuple[int, ...] = (64, 256, 1024)


def _sizes(values: Sequence[int], name: str) -> tuple[int, ...]:
    try:
        sizes = tuple(sorted({int(v) for v in values}))
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be positive integers, got {values!r}") from None
    if not sizes or sizes[0] < 1:
        raise ValueError(f"{name} must be non-empty positive integers, got {values!r}")
    return sizes


@dataclasses.dataclass(frozen=True)
class Buckets:
    """The static request-batch sizes and candidate-chunk sizes a scorer compiles for (sorted, unique)."""

    request_sizes: tuple[int, ...] = DEFAULT_REQUEST_SIZES
    chunk_sizes: tuple[int, ...] = DEFAULT_CHUNK_SIZES

    def __post_init__(self) -> None:
        object.__setattr__(self, "request_sizes", _sizes(self.request_sizes, "request_sizes"))
        object.__setattr__(self, "chunk_sizes", _sizes(self.chunk_sizes, "chunk_sizes"))

    @property
    def max_requests(self) -> int:
        return self.request_sizes[-1]

    def request_bucket(self, num_requests: int) -> int:
        """The smallest request-batch size holding ``num_requests`` (1 <= num_requests <= max_requests)."""
        if not 1 <= num_requests <= self.max_requests:
            raise ValueError(f"request_bucket: {num_requests} requests, expected 1..{self.max_requests}")
        return next(r for r in self.request_sizes if r >= num_requests)

    def chunk_plan(self, num_candidates: int, coarse: bool = False) -> list[tuple[int, int]]:
        """``[(start, size), ...]`` chunks covering ``num_candidates`` slots, every size a chunk bucket.

        Greedy: the largest bucket that fits in what is left, and for the tail the smallest bucket that
        covers it, so padding stays below the smallest bucket for any count (e.g. 1100 with (64, 256, 1024)
        -> 1024 + 64 + 64). ``coarse`` (for callers whose padding is cheap, e.g. blocked scoring that skips
        padding blocks): the largest bucket while more is left, then the smallest that covers the whole tail,
        so fewer calls (1100 -> 1024 + 256). Zero candidates give no chunks.
        """
        plan: list[tuple[int, int]] = []
        start, left = 0, int(num_candidates)
        while left > 0:
            fitting = [c for c in self.chunk_sizes if c <= left]
            if coarse and left <= self.chunk_sizes[-1]:
                fitting = [next(c for c in self.chunk_sizes if c >= left)]
            size = fitting[-1] if fitting else self.chunk_sizes[0]
            plan.append((start, size))
            start, left = start + size, left - size
        return plan

    def shapes(self) -> list[tuple[int, int]]:
        """Every (request-batch size, chunk size) pair a warm-up compiles."""
        return [(r, c) for r in self.request_sizes for c in self.chunk_sizes]

    def to_dict(self) -> dict[str, list[int]]:
        return {"request_sizes": list(self.request_sizes), "chunk_sizes": list(self.chunk_sizes)}

    @classmethod
    def from_dict(cls, data: dict) -> Buckets:
        return cls(tuple(data["request_sizes"]), tuple(data["chunk_sizes"]))

    @classmethod
    def parse(cls, requests: str | None = None, chunks: str | None = None) -> Buckets:
        """Buckets from comma-separated strings (the CLI's ``--request-buckets 1,16 --chunk-buckets 64,1024``)."""

        def ints(text: str | None, default: tuple[int, ...], name: str) -> tuple[int, ...]:
            if text is None:
                return default
            try:
                return tuple(int(t) for t in text.split(",") if t.strip())
            except ValueError:
                raise ValueError(f"{name} must be comma-separated integers, got {text!r}") from None

        return cls(
            ints(requests, DEFAULT_REQUEST_SIZES, "request buckets"), ints(chunks, DEFAULT_CHUNK_SIZES, "chunk buckets")
        )
