"""Seconds of the ES update's noise sum at the paper's sizes: every rank vs node-split.

    mpiexec -n K python bench/update.py [--pair-fraction 0.05] [--table 250000000]

Variants, all bitwise equal (checked here):
  every rank, plain    each rank sums all N eps over all d coordinates in one pass per eps
  every rank, blocked  the same in cache-sized blocks of coordinates (es.NOISE_SUM_BLOCK)
  node-split           the node's ranks each sum a 1/K range (blocked) into a node-shared
                       vector, then every rank copies it (run.update: node_split, the default)
Each variant runs on all K ranks at once (as in a run) and the slowest rank's time counts.
The bound is the bytes the node must read from memory (N x d x 4 for node-split, K times that
for every rank) over the node's read bandwidth, measured here with all K ranks streaming.
`--pair-fraction` scales N down (time is linear in N); seconds are scaled back to the full N.
Optimiser step: one Adam / SGD step on d float64 coordinates, for scale.
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

from es_mpi import comm as mpi  # noqa: E402
from es_mpi import es, noise  # noqa: E402
from es_mpi.config import ESConfig  # noqa: E402

SETTINGS = {"mlp-humanoid": (5000, 166_673), "dt-humanoid": (20000, 824_970),
            "dt-atari": (40000, 2_965_792)}


def timed(comm, fn) -> tuple[float, object]:
    """Slowest rank's seconds of fn() run on every rank at once."""
    comm.Barrier()
    t0 = time.perf_counter()
    out = fn()
    elapsed = time.perf_counter() - t0
    return comm.allreduce(elapsed, op=mpi.MPI.MAX), out


def read_bandwidth(comm, table: np.ndarray) -> float:
    """Bytes per second the node reads with every rank streaming its own part of the table."""
    part = table.size // comm.Get_size()
    mine = table[comm.Get_rank() * part: (comm.Get_rank() + 1) * part]
    best = min(timed(comm, lambda: float(np.add.reduce(mine, dtype=np.float32)))[0]
               for _ in range(3))
    return part * 4 * comm.Get_size() / best


def bench_setting(comm, table, node_sum_dim, pairs: int, dim: int) -> dict:
    draws = noise.iteration_draws(0, 0, pairs, table.size, dim, 0.0, 0)
    rng = np.random.default_rng(0)
    w = es.fitness_weights(rng.normal(size=pairs), rng.normal(size=pairs), "pair_ranks")
    node_sum = mpi.NodeSum.allocate(comm, node_sum_dim)
    view = mpi.NodeSum(node_sum.array[:dim], node_sum.window, node_sum.node_comm)
    out = {}
    out["every rank, plain"] = timed(comm, lambda: es.weighted_noise_sum(
        table, draws.offsets, w, 0, dim, block=dim))
    out["every rank, blocked"] = timed(comm, lambda: es.weighted_noise_sum(
        table, draws.offsets, w, 0, dim))
    out["node-split"] = timed(comm, lambda: view.combine(
        lambda lo, hi: es.weighted_noise_sum(table, draws.offsets, w, lo, hi)))
    ref = out["every rank, plain"][1]
    assert all(np.array_equal(v[1], ref) for v in out.values()), "variants differ"
    g = es.gradient_estimate(ref, pairs, 0.02)
    step, _ = timed(comm, lambda: es.es_update(np.zeros(dim, np.float32), g,
                                               es.OptimizerState.zeros(dim),
                                               ESConfig(population=pairs, sigma=0.02)))
    node_sum.free()
    return {k: v[0] for k, v in out.items()} | {"step": step}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--table", type=int, default=250_000_000, help="noise table size")
    p.add_argument("--pair-fraction", type=float, default=0.05,
                   help="run this share of each setting's pairs (seconds are scaled back)")
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset")
    args = p.parse_args()
    comm = mpi.world()
    k = comm.Get_size()
    shared = mpi.shared_noise_table(comm, args.table, 123)
    bandwidth = read_bandwidth(comm, shared.table)
    names = args.settings.split(",")
    largest = max(SETTINGS[n][1] for n in names)
    if comm.Get_rank() == 0:
        print(f"{k} rank(s) on {shared.node_comm.Get_size()} per node; node read bandwidth "
              f"{bandwidth / 1e9:.1f} GB/s; pairs x {args.pair_fraction}, seconds scaled to "
              f"the full N", flush=True)
        print("| setting | N x d | every rank, plain | every rank, blocked | node-split | "
              "bound (node-split) | node-split / bound | optimiser step |\n"
              "|---|---|---|---|---|---|---|---|", flush=True)
    for name in names:
        pairs, dim = SETTINGS[name]
        run_pairs = max(1, int(pairs * args.pair_fraction))
        t = bench_setting(comm, shared.table, largest, run_pairs, dim)
        scale = pairs / run_pairs
        bound = pairs * dim * 4 / bandwidth
        if comm.Get_rank() == 0:
            print(f"| {name} | {pairs:,} x {dim:,} | {t['every rank, plain'] * scale:.2f} s | "
                  f"{t['every rank, blocked'] * scale:.2f} s | {t['node-split'] * scale:.2f} s "
                  f"| {bound:.2f} s | {t['node-split'] * scale / bound:.2f} | "
                  f"{t['step'] * 1e3:.1f} ms |", flush=True)
    shared.free()


if __name__ == "__main__":
    main()
