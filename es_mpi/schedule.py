"""Which episodes of an iteration a rank runs: the work items and how they are handed out.

Pure functions, no MPI. An iteration's work is E evaluation episodes of theta and 2N training
episodes (pair j at +sigma and at -sigma). Items are numbered so that the evaluation episodes
come first (they are not capped by the adaptive episode cap, so they are the longest):

    item e            for evaluation episode e = 0..E-1
    item E + 2j + s   for training episode (j, s), s = 0 for +sigma, 1 for -sigma

Results are keyed by item, never by rank, so any assignment of items to ranks gives the same
theta. Two assignments (es_mpi.iteration.ASSIGNMENTS):

- static: rank r runs the contiguous block of pairs `split_range(N, P, r)` (both signs) and the
  evaluation episodes r, r + P, ...; the iteration lasts as long as the unluckiest rank.
- dynamic: ranks take chunks of items from a shared counter until none is left. The chunks
  (`chunk_bounds`) are fixed in advance from (E, N, P), so the counter only hands out chunk
  numbers: one single-item chunk per evaluation episode first, then guided self-scheduling over
  the training episodes, each chunk ceil(remaining / (GUIDED_FACTOR * P)) items, shrinking to
  single episodes as the pool empties.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Guided self-scheduling: chunk = ceil(remaining / (GUIDED_FACTOR * ranks)). 1 is classic
# guided scheduling (first chunks of 1/P of the pool: a rank that drew long episodes in its
# first chunk can leave the rest idle); 2 halves that risk for about twice the fetches.
GUIDED_FACTOR = 2.0


@dataclass(frozen=True)
class Item:
    """What one work item is: an evaluation episode (sign None) or a training episode."""

    index: int  # evaluation episode e, or pair j
    sign: int | None = None  # 0: theta + sigma eps_j, 1: theta - sigma eps_j; None: evaluation

    @property
    def is_eval(self) -> bool:
        return self.sign is None


def decode(item: int, n_eval: int) -> Item:
    """Item number -> (evaluation episode e) or (pair j, sign s)."""
    if item < n_eval:
        return Item(item)
    j, s = divmod(item - n_eval, 2)
    return Item(j, s)


def train_key(item: int, n_eval: int) -> int:
    """The result key 2j + s of a training item (its position in the (N, 2) result arrays)."""
    return item - n_eval


def split_range(n: int, size: int, rank: int) -> tuple[int, int]:
    """Contiguous block [lo, hi) of 0..n-1 for `rank` (sizes differ by at most one)."""
    base, extra = divmod(n, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def static_items(n_eval: int, n_pairs: int, n_ranks: int, rank: int) -> list[int]:
    """The static assignment: this rank's pairs (both signs), then its evaluation episodes."""
    lo, hi = split_range(n_pairs, n_ranks, rank)
    train = list(range(n_eval + 2 * lo, n_eval + 2 * hi))
    return train + list(range(rank, n_eval, n_ranks))


def chunk_bounds(n_eval: int, n_pairs: int, n_ranks: int,
                 factor: float = GUIDED_FACTOR) -> np.ndarray:
    """Boundaries b of the dynamic chunks: chunk c holds items b[c] .. b[c+1]-1.

    Evaluation episodes one per chunk, then guided chunks over the 2N training episodes.
    """
    bounds = list(range(n_eval + 1))
    remaining = 2 * n_pairs
    while remaining > 0:
        size = min(remaining, max(1, int(np.ceil(remaining / (factor * n_ranks)))))
        bounds.append(bounds[-1] + size)
        remaining -= size
    return np.asarray(bounds, dtype=np.int64)
