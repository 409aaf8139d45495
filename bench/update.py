"""Seconds of the ES update's noise sum at the paper's sizes: NumPy vs the compiled kernel,
every rank vs node-split, against the memory-read bound.

    mpiexec -n K python bench/update.py [--pair-fraction 0.05] [--rounds 3] [--table 250000000]

Variants, all bitwise equal (checked here):
  numpy, every rank, plain    each rank sums all N eps over all d coordinates, one pass per eps
  numpy, every rank, blocked  the same in cache-sized blocks of coordinates (es.NOISE_SUM_BLOCK)
  numpy, node-split           the node's ranks each sum a 1/K range (blocked) into a node-shared
                              vector, then every rank copies it (run.update: node_split)
  kernel, every rank          es_mpi/_noise_sum.c (8 eps per pass over an es.KERNEL_BLOCK
                              block, prefetching), each rank summing everything
  kernel, node-split          the kernel on each rank's 1/K range: what a run does by default
Each variant runs on all K ranks at once (as in a run) and the slowest rank's time counts; the
variants alternate within each of --rounds rounds and the fastest round counts.
The bound is the bytes the node must read from memory (N x d x 4 for node-split, K times that
for every rank) over the node's read bandwidth, measured in the same rounds with all K ranks
streaming their own part of the table through the kernel's stream_read (an OR of the table's
words, as fast as a core reads; NumPy's float32 add.reduce reads at about half that speed).
`--pair-fraction` scales N down (time is linear in N); seconds are scaled back to the full N.
Optimiser step: one SGD-momentum step with decoupled decay on d float64 coordinates on every
rank at once, and on d/K (what a node-split optimiser would do), for scale.
"""
from __future__ import annotations

import os  # noqa: F401
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's es_mpi

from es_mpi.determinism import pin_cpu_kernels  # noqa: E402

pin_cpu_kernels()  # as es_mpi.run: one thread per rank, the same CPU kernels

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from es_mpi import comm as mpi  # noqa: E402
from es_mpi import es, noise  # noqa: E402
from es_mpi.config import ESConfig  # noqa: E402

SETTINGS = {"mlp-humanoid": (5000, 166_673), "dt-humanoid": (20000, 824_970),
            "dt-atari": (40000, 2_965_792)}
NUMPY = ("numpy, every rank, plain", "numpy, every rank, blocked", "numpy, node-split")
KERNEL = ("kernel, every rank", "kernel, node-split")


def timed(comm, fn) -> tuple[float, object]:
    """Slowest rank's seconds of fn() run on every rank at once."""
    comm.Barrier()
    t0 = time.perf_counter()
    out = fn()
    elapsed = time.perf_counter() - t0
    return comm.allreduce(elapsed, op=mpi.MPI.MAX), out


def read_seconds(comm, table: np.ndarray) -> float:
    """Slowest rank's seconds to read its 1/K of the table, all K ranks at once."""
    part = table.size // comm.Get_size()
    mine = table[comm.Get_rank() * part: (comm.Get_rank() + 1) * part]
    if es._noise_sum is not None:
        return timed(comm, lambda: es._noise_sum.stream_read(mine))[0]
    return timed(comm, lambda: np.bitwise_or.reduce(mine.view(np.int32)))[0]


def variants(table, offsets, w, dim: int, view) -> dict:
    """Name -> fn() -> noise sum, each a way to compute the same bits."""
    def node_split(kernel):
        return lambda: view.combine(lambda lo, hi: es.weighted_noise_sum(
            table, offsets, w, lo, hi, kernel=kernel))

    out = {NUMPY[0]: lambda: es.weighted_noise_sum(table, offsets, w, 0, dim, dim, "numpy"),
           NUMPY[1]: lambda: es.weighted_noise_sum(table, offsets, w, 0, dim, kernel="numpy"),
           NUMPY[2]: node_split("numpy")}
    if "kernel" in es.NOISE_SUMS:
        out |= {KERNEL[0]: lambda: es.weighted_noise_sum(table, offsets, w, 0, dim),
                KERNEL[1]: node_split("kernel")}
    return out


def step_seconds(comm, dim: int, pairs: int, rounds: int) -> float:
    """Fastest of `rounds` optimiser steps from a used state (its pages already touched)."""
    rng = np.random.default_rng(1)
    theta, g = rng.normal(size=dim).astype(np.float32), rng.normal(size=dim)
    state = es.OptimizerState(1, rng.normal(size=dim), np.zeros(dim))
    cfg = ESConfig(population=pairs, sigma=0.02)  # SGD momentum, decoupled decay
    return min(timed(comm, lambda: es.es_update(theta, g, state, cfg))[0]
               for _ in range(rounds + 1))


def bench_setting(comm, table, node_sum, pairs: int, dim: int, rounds: int) -> dict:
    """Fastest round's seconds of every variant, of the table read and of the optimiser step."""
    draws = noise.iteration_draws(0, 0, pairs, table.size, dim, 0.0, 0)
    rng = np.random.default_rng(0)
    w = es.fitness_weights(rng.normal(size=pairs), rng.normal(size=pairs), "pair_ranks")
    view = mpi.NodeSum(node_sum.array[:dim], node_sum.window, node_sum.node_comm)
    fns = variants(table, draws.offsets, w, dim, view)
    best, ref = {}, None
    for _ in range(rounds):
        best["read"] = min(best.get("read", np.inf), read_seconds(comm, table))
        for name, fn in fns.items():
            seconds, result = timed(comm, fn)
            best[name] = min(best.get(name, np.inf), seconds)
            ref = result if ref is None else ref
            assert np.array_equal(result, ref), f"{name} differs"
    k = comm.Get_size()
    best["step"] = step_seconds(comm, dim, pairs, rounds)
    best["step split"] = step_seconds(comm, -(-dim // k), pairs, rounds)
    return best


def report(name: str, t: dict, pairs: int, dim: int, scale: float, table_size: int, k: int):
    """One markdown row: seconds at the full N, the bound and the ratios."""
    bandwidth = table_size // k * k * 4 / t["read"]
    bound = pairs * dim * 4 / bandwidth
    cells = [f"{t[v] * scale:.2f} s" if v in t else "-" for v in NUMPY + KERNEL]
    ratios = [f"{t[v] * scale / bound:.2f}" if v in t else "-" for v in (NUMPY[2], KERNEL[1])]
    print(f"| {k} | {name} | {pairs:,} x {dim:,} | " + " | ".join(cells)
          + f" | {bound:.2f} s ({bandwidth / 1e9:.0f} GB/s) | " + " | ".join(ratios)
          + f" | {t['step'] * 1e3:.0f} / {t['step split'] * 1e3:.0f} ms |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--table", type=int, default=250_000_000, help="noise table size")
    p.add_argument("--pair-fraction", type=float, default=0.05,
                   help="run this share of each setting's pairs (seconds are scaled back)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; the fastest counts")
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset")
    args = p.parse_args()
    comm = mpi.world()
    k = comm.Get_size()
    shared = mpi.shared_noise_table(comm, args.table, 123)
    names = args.settings.split(",")
    node_sum = mpi.NodeSum.allocate(comm, max(SETTINGS[n][1] for n in names))
    if comm.Get_rank() == 0:
        print(f"{k} rank(s) on {shared.node_comm.Get_size()} per node; noise sum: "
              f"{es.NOISE_SUM_KERNEL}; pairs x {args.pair_fraction}, seconds scaled to the "
              f"full N; fastest of {args.rounds} rounds", flush=True)
        print("| K | setting | N x d | " + " | ".join(NUMPY + KERNEL) + " | bound (node-split) "
              "| numpy node-split / bound | kernel node-split / bound | optimiser step "
              "(d / d/K) |\n|" + "---|" * 12, flush=True)
    for name in names:
        pairs, dim = SETTINGS[name]
        run_pairs = max(1, int(pairs * args.pair_fraction))
        t = bench_setting(comm, shared.table, node_sum, run_pairs, dim, args.rounds)
        if comm.Get_rank() == 0:
            report(name, t, pairs, dim, pairs / run_pairs, shared.table.size, k)
    node_sum.free()
    shared.free()


if __name__ == "__main__":
    main()
