"""The work items of an iteration and their static and dynamic assignments (pure, no MPI)."""
import numpy as np
import pytest

from es_mpi.schedule import (GUIDED_FACTOR, Item, chunk_bounds, decode, split_range,
                             static_items, train_key)

SIZES = [(0, 1), (1, 1), (1, 5), (3, 40), (2, 20_000), (1, 5_000)]


@pytest.mark.parametrize("n_eval, n_pairs", SIZES)
def test_items_decode_to_every_episode_once(n_eval, n_pairs):
    items = [decode(i, n_eval) for i in range(n_eval + 2 * n_pairs)]
    assert [it.index for it in items if it.is_eval] == list(range(n_eval))
    train = [(it.index, it.sign) for it in items if not it.is_eval]
    assert train == [(j, s) for j in range(n_pairs) for s in (0, 1)]
    assert [train_key(i, n_eval) for i in range(n_eval, n_eval + 2 * n_pairs)] == \
        list(range(2 * n_pairs))
    assert decode(n_eval + 5, n_eval) == Item(2, 1)


@pytest.mark.parametrize("n_eval, n_pairs", SIZES)
@pytest.mark.parametrize("ranks", [1, 2, 3, 7, 300, 1440])
def test_static_assignment_partitions_the_items(n_eval, n_pairs, ranks):
    if ranks > 300 and n_pairs > 100:
        ranks = 300  # keep the test quick
    per_rank = [static_items(n_eval, n_pairs, ranks, r) for r in range(ranks)]
    assert sorted(sum(per_rank, [])) == list(range(n_eval + 2 * n_pairs))
    for r, items in enumerate(per_rank):  # both signs of a pair stay on one rank, as before
        lo, hi = split_range(n_pairs, ranks, r)
        assert [i for i in items if i >= n_eval] == list(range(n_eval + 2 * lo, n_eval + 2 * hi))


@pytest.mark.parametrize("n_eval, n_pairs", SIZES)
@pytest.mark.parametrize("ranks", [1, 2, 3, 300, 1440])
def test_dynamic_chunks_cover_every_item_once_and_shrink(n_eval, n_pairs, ranks):
    b = chunk_bounds(n_eval, n_pairs, ranks)
    assert b[0] == 0 and b[-1] == n_eval + 2 * n_pairs
    sizes = np.diff(b)
    assert np.all(sizes >= 1)
    assert np.all(sizes[:n_eval] == 1)  # evaluation episodes first, one per chunk
    train = sizes[n_eval:]
    assert np.all(np.diff(train) <= 0)  # guided: chunks shrink as the pool empties
    if train.size:
        assert train[0] == int(np.ceil(2 * n_pairs / (GUIDED_FACTOR * ranks)))
        assert train[-1] == 1  # the pool ends in single episodes
    # each chunk is at most 1/(factor P) of what was left: no rank can hold up the rest long
    left = 2 * n_pairs - np.concatenate([[0], np.cumsum(train)[:-1]])
    assert np.all(train <= np.maximum(1, np.ceil(left / (GUIDED_FACTOR * ranks))))


def test_chunk_count_grows_slowly():
    """Fetches per iteration: about factor * P * ln(pool / (factor * P)) + factor * P."""
    for n_pairs, ranks in ((20_000, 300), (5_000, 1440), (40_000, 16)):
        chunks = len(chunk_bounds(1, n_pairs, ranks)) - 1
        bound = GUIDED_FACTOR * ranks * (np.log(2 * n_pairs / (GUIDED_FACTOR * ranks)) + 2) + 1
        assert chunks <= max(bound, 2 * n_pairs), (n_pairs, ranks, chunks)
