"""The shared noise table and the per-perturbation draws of the common-random-numbers protocol.

The table is N(0,1) float32 values generated in fixed-size chunks, chunk k from the seed
sequence (noise_seed, k). Its content therefore depends only on (noise_seed, size), never on
how many processes fill it or which process fills which chunk. `comm.shared_noise_table`
places it once per node in MPI shared memory; this module holds no MPI code.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CHUNK = 1 << 22  # values per independently seeded chunk (16 MiB of float32)


def n_chunks(size: int) -> int:
    return (size + CHUNK - 1) // CHUNK


def fill_chunk(table: np.ndarray, noise_seed: int, k: int) -> None:
    """Write chunk k of the table in place (table is the whole flat float32 array)."""
    lo, hi = k * CHUNK, min((k + 1) * CHUNK, table.size)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([noise_seed, k])))
    rng.standard_normal(hi - lo, dtype=np.float32, out=table[lo:hi])


def make_table(size: int, noise_seed: int) -> np.ndarray:
    """A private (non-shared) table; used by tests and tools that need no MPI."""
    table = np.empty(size, dtype=np.float32)
    for k in range(n_chunks(size)):
        fill_chunk(table, noise_seed, k)
    return table


@dataclass(frozen=True)
class Draws:
    """What perturbation j of one iteration needs, for every j: derived from (seed, t, j) only."""

    offsets: np.ndarray  # (N,) int64, eps_j = table[offsets[j] : offsets[j] + dim]
    env_seeds: np.ndarray  # (N,) int64, reset seed shared by the +/- episodes of pair j
    record_obs: np.ndarray  # (N,) bool, pair j's + episode feeds the observation statistics
    eval_seeds: np.ndarray  # (E,) int64, reset seeds of the unperturbed evaluation episodes


def iteration_draws(run_seed: int, iteration: int, population: int, table_size: int, dim: int,
                    obs_stat_prob: float, eval_episodes: int) -> Draws:
    """Offsets, env seeds and obs-stat selection for every perturbation of one iteration.

    One generator per (run_seed, iteration) draws the values for j = 0..N-1 in order, so each
    value is a function of (run_seed, iteration, j) alone and every rank computes the same
    arrays without communicating.
    """
    if dim > table_size:
        raise ValueError(f"es.noise_table_size={table_size} is smaller than the policy's "
                         f"{dim} parameters")
    ss = np.random.SeedSequence([run_seed, iteration, 0x5EED])
    r_off, r_env, r_obs, r_eval = (np.random.Generator(np.random.PCG64(s)) for s in ss.spawn(4))
    return Draws(
        offsets=r_off.integers(0, table_size - dim + 1, size=population, dtype=np.int64),
        env_seeds=r_env.integers(0, 2**31 - 1, size=population, dtype=np.int64),
        record_obs=r_obs.random(population) < obs_stat_prob,
        eval_seeds=r_eval.integers(0, 2**31 - 1, size=eval_episodes, dtype=np.int64),
    )
