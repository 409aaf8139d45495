"""Seconds per ES update on one rank: rebuild sum_j w_j eps_j from the noise table, then step.

    python bench/update.py [--pairs 5000 --dim 166673] [--pairs 20000 --dim 825000]

Every rank does this whole computation each iteration (DESIGN §2.5); it is what the node-split
update of DESIGN §7 will share across a node's ranks by coordinate range.
"""
from __future__ import annotations

import os  # noqa: F401

from es_mpi.determinism import pin_cpu_kernels

pin_cpu_kernels()  # as es_mpi.run: one thread per rank, the same CPU kernels

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from es_mpi import es, noise  # noqa: E402
from es_mpi.config import ESConfig  # noqa: E402

SETTINGS = {"mlp-humanoid": (5000, 166_673), "dt-humanoid": (20000, 825_000)}


def time_update(pairs: int, dim: int, table: np.ndarray) -> tuple[float, float]:
    draws = noise.iteration_draws(0, 0, pairs, table.size, dim, 0.0, 0)
    rng = np.random.default_rng(0)
    w = es.fitness_weights(rng.normal(size=pairs), rng.normal(size=pairs), "centered_ranks")
    t0 = time.perf_counter()
    g = es.gradient_estimate(es.weighted_noise_sum(table, draws.offsets, w, 0, dim), pairs, 0.02)
    t1 = time.perf_counter()
    es.es_update(np.zeros(dim, np.float32), g, es.OptimizerState.zeros(dim),
                 ESConfig(population=pairs, sigma=0.02))
    return t1 - t0, time.perf_counter() - t1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--table", type=int, default=250_000_000, help="noise table size")
    args = p.parse_args()
    table = noise.make_table(args.table, 123)
    for name, (pairs, dim) in SETTINGS.items():
        rebuild, step = time_update(pairs, dim, table)
        print(f"{name:<14} {pairs:6d} pairs x {dim:8,d} params: noise rebuild {rebuild:6.2f} s "
              f"({rebuild / pairs * 1e6:5.0f} us/pair), optimiser step {step * 1e3:6.1f} ms")


if __name__ == "__main__":
    main()
