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
    env_seeds: np.ndarray  # (N, 2) int64, reset seeds of episodes (j, +) and (j, -)
    record_obs: np.ndarray  # (N, 2) bool, episode (j, +) / (j, -) feeds the observation statistics
    eval_seeds: np.ndarray  # (E,) int64, reset seeds of the unperturbed evaluation episodes
    # (N,) float64 target return R*_j of pair j, both signs alike (es.fitness target_return);
    # None when the fitness is the plain return
    targets: np.ndarray | None = None


def _seeds(rng: np.random.Generator, shape) -> np.ndarray:
    return rng.integers(0, 2**31 - 1, size=shape, dtype=np.int64)


# es.env_seeds -> (generator, N) -> (N, 2) reset seeds of the episodes (j, +), (j, -): one for
# the whole population (Lorenc & Neruda), one per mirrored pair (both signs start alike), or one
# per episode (OpenAI, who never seed)
ENV_SEEDS = {
    "per_iteration": lambda rng, n: np.broadcast_to(_seeds(rng, (1, 1)), (n, 2)).copy(),
    "per_pair": lambda rng, n: np.repeat(_seeds(rng, (n, 1)), 2, axis=1),
    "per_episode": lambda rng, n: _seeds(rng, (n, 2)),
}


@dataclass(frozen=True)
class TargetSpec:
    """How the target returns R*_j of es.fitness target_return are drawn (es.target_*)."""

    draw: str  # es.target_draw: a key of TARGET_DRAWS
    range: tuple[float, float] = (0.0, 0.0)  # uniform: [low, high)
    values: tuple[float, ...] = ()  # list: the possible targets

    @classmethod
    def of(cls, es_cfg) -> "TargetSpec | None":
        """The spec of an `ESConfig`, or None when its fitness is the plain return."""
        if es_cfg.fitness != "target_return":
            return None
        return cls(es_cfg.target_draw, tuple(float(v) for v in es_cfg.target_range) or (0.0, 0.0),
                   tuple(float(v) for v in es_cfg.target_values))


# es.target_draw -> (generator, N, spec) -> (N,) float64 targets, drawn for j = 0..N-1 in order
TARGET_DRAWS = {
    "uniform": lambda rng, n, spec: rng.uniform(spec.range[0], spec.range[1], n),
    "list": lambda rng, n, spec: np.asarray(spec.values, dtype=np.float64)[
        rng.integers(0, len(spec.values), n)],
}


def pair_targets(run_seed: int, iteration: int, population: int, spec: TargetSpec) -> np.ndarray:
    """(N,) target returns R*_j, a function of (run_seed, iteration, j) alone: one generator per
    (run seed, t), of its own (the other draws are the same with or without targets)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
        [run_seed, iteration, 0x7A26E7])))
    return TARGET_DRAWS[spec.draw](rng, population, spec)


def iteration_draws(run_seed: int, iteration: int, population: int, table_size: int, dim: int,
                    obs_stat_prob: float, eval_episodes: int,
                    env_seed_mode: str = "per_pair", targets: TargetSpec | None = None) -> Draws:
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
        env_seeds=ENV_SEEDS[env_seed_mode](r_env, population),
        record_obs=r_obs.random((population, 2)) < obs_stat_prob,
        eval_seeds=_seeds(r_eval, eval_episodes),
        targets=None if targets is None else pair_targets(run_seed, iteration, population, targets),
    )


# What an episode's own randomness (action noise, dropout masks, sampled actions) is keyed by.
TRAIN_EPISODE, EVAL_EPISODE = 0, 1


def episode_seed(run_seed: int, iteration: int, kind: int, index: int, sign: int) -> int:
    """A 63-bit seed for one episode's stochastic choices, from (run seed, t, kind, j, sign).

    kind is TRAIN_EPISODE (index = pair j, sign 0 for +sigma, 1 for -sigma) or EVAL_EPISODE
    (index = evaluation episode e, sign 0). Like the draws, it never depends on the rank.
    With es.env_seeds per_iteration the caller passes index 0 for every pair: Lorenc &
    Neruda reseed torch identically for every member of an iteration, so the population
    shares its dropout masks and action samples as it shares its start state.
    """
    ss = np.random.SeedSequence([run_seed, iteration, 0xE915, kind, index, sign])
    return int(ss.generate_state(1, np.uint64)[0] >> np.uint64(1))
