"""Noise table content and per-perturbation draws depend on seeds only."""
import numpy as np
import pytest

from es_mpi import noise


def test_table_is_standard_normal_and_reproducible():
    a = noise.make_table(noise.CHUNK + 12345, noise_seed=7)
    assert a.dtype == np.float32
    assert abs(a.mean()) < 0.01 and abs(a.std() - 1) < 0.01
    assert np.array_equal(a, noise.make_table(a.size, noise_seed=7))
    assert not np.array_equal(a[:100], noise.make_table(100, noise_seed=8))


def test_chunks_are_independent_of_fill_order():
    size = 2 * noise.CHUNK + 99
    forward = noise.make_table(size, 5)
    backward = np.empty(size, dtype=np.float32)
    for k in reversed(range(noise.n_chunks(size))):
        noise.fill_chunk(backward, 5, k)
    assert np.array_equal(forward, backward)
    # a shorter table is a prefix of a longer one
    assert np.array_equal(noise.make_table(1000, 5), forward[:1000])


def test_iteration_draws_are_keyed_by_seed_iteration_and_j():
    kw = dict(table_size=10_000, dim=100, obs_stat_prob=0.3, eval_episodes=2)
    a = noise.iteration_draws(1, 4, 50, **kw)
    b = noise.iteration_draws(1, 4, 20, **kw)
    assert np.array_equal(a.offsets[:20], b.offsets)  # j's draw does not depend on N
    assert np.array_equal(a.env_seeds[:20], b.env_seeds)
    assert np.array_equal(a.record_obs[:20], b.record_obs)
    assert a.offsets.max() <= 10_000 - 100 and a.offsets.min() >= 0
    c = noise.iteration_draws(1, 5, 50, **kw)
    assert not np.array_equal(a.offsets, c.offsets)
    d = noise.iteration_draws(2, 4, 50, **kw)
    assert not np.array_equal(a.env_seeds, d.env_seeds)


def test_table_smaller_than_policy_is_an_error():
    with pytest.raises(ValueError, match="noise_table_size"):
        noise.iteration_draws(0, 0, 1, table_size=10, dim=11, obs_stat_prob=0, eval_episodes=0)
