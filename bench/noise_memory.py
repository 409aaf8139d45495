"""Resident memory per rank of the node-shared noise table vs a private copy per rank.

    mpiexec -n 1 python bench/noise_memory.py [--size 250000000]
    mpiexec -n 2 python bench/noise_memory.py

Reads /proc/self/smaps_rollup after every rank has read the whole table: RSS counts shared
pages in full on every rank, PSS divides them among the ranks that map them, so the node's
real cost is the sum of PSS.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from es_mpi import comm as mpi  # noqa: E402
from es_mpi import noise  # noqa: E402


def memory_mib() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Rss", "Pss"):
            out[key] = int(value.split()[0]) / 1024
    return out


def report(comm, label: str, before: dict, seconds: float) -> None:
    after = memory_mib()
    rows = comm.gather((after["Rss"] - before["Rss"], after["Pss"] - before["Pss"]))
    if comm.Get_rank() == 0:
        rss, pss = np.array(rows).T
        print(f"{label:<28} {comm.Get_size()} rank(s): RSS/rank {rss.mean():8.0f} MiB, "
              f"PSS/rank {pss.mean():8.0f} MiB, node PSS {pss.sum():8.0f} MiB, "
              f"build {seconds:5.1f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=250_000_000, help="float32 values")
    p.add_argument("--private", action="store_true", help="also measure a private copy per rank")
    args = p.parse_args()
    comm = mpi.world()
    if comm.Get_rank() == 0:
        print(f"noise table: {args.size:,} float32 = {args.size * 4 / 2**20:,.0f} MiB")

    before = memory_mib()
    start = time.perf_counter()
    shared = mpi.shared_noise_table(comm, args.size, noise_seed=123)
    built = time.perf_counter() - start
    checksum = float(shared.table[:: 1024].sum())  # touch every page of the table
    checksum += float(shared.table.sum(dtype=np.float64))
    comm.Barrier()
    report(comm, "shared (one per node)", before, built)
    shared.free()
    del shared
    comm.Barrier()

    if args.private:
        before = memory_mib()
        start = time.perf_counter()
        table = noise.make_table(args.size, 123)
        built = time.perf_counter() - start
        checksum += float(table.sum(dtype=np.float64))
        comm.Barrier()
        report(comm, "private (one per rank)", before, built)


if __name__ == "__main__":
    main()
