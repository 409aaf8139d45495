"""Weak scaling on one node: es_mpi's training path vs a raw env + policy loop at P ranks.

    python bench/scaling.py [--ranks 1,2] [--jobs humanoid_mlp,humanoid_dt] [--seconds 25]
    python bench/scaling.py --ranks 1,2,4,8,16          # on a 16-core node

For each P the script starts `mpiexec -n P` (one process per rank) and, on every rank at once:
- es_mpi path: real iterations (`iteration.run_iteration`) of the shipped job, shrunk to a
  population proportional to P (bench/paper_jobs.py: pairs per rank, one evaluation episode per
  rank up to the job's own number, a small noise table), after one warm-up iteration;
- raw loop (bench/step_path.py's RawLoop): the training path's own episodes replayed bare: its
  current theta +- sigma eps_j for this rank's pairs, their reset seeds, episode cap and action
  noise, on `env.unwrapped` with the observation normalisation folded into the first layer.
  Nothing runs per step but the env and the policy's act(). The same policies visit the same
  kind of states: a MuJoCo step costs more or less with the contacts of the state, and a DT's
  step grows with its context, so a loop at a fixed theta would compare other episodes.
The two alternate in rounds within one run (the node's speed drifts as other work comes and
goes, and it slows down as it fills, so the comparison is at equal P). Steps per second per
rank: env steps of all ranks (training and evaluation episodes) / P / wall seconds. Target:
es_mpi >= 90 % of the raw loop. Rates are averaged over the ranks and the median over the
rounds is shown; the iteration's seconds and its stages (results.h5's time_rollout, time_comm,
time_update on rank 0) and rollout_idle (1 - mean/max of the ranks' seconds in episodes) are
medians over the iterations.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from es_mpi.determinism import pin_cpu_kernels  # noqa: E402

pin_cpu_kernels()  # as es_mpi.run: one thread per rank, the same CPU kernels

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402

from paper_jobs import REPO, shrunk  # noqa: E402


def bench_job(comm, name: str, args) -> dict | None:
    """Alternating rounds of the raw loop and the training path on every rank."""
    from step_path import RawLoop  # bench/step_path.py
    from throughput import ESPath  # bench/throughput.py

    cfg = shrunk(name, comm.Get_size(), args.pairs_per_rank)
    ours = ESPath(cfg, comm)
    raw = RawLoop(ours, "torch")
    rates = np.zeros((args.rounds, 2))  # steps/s this round: raw loop, es_mpi
    share = args.seconds / args.rounds
    for r in range(args.rounds):
        for k, (steps, secs) in enumerate((raw.run(share), ours.run(share))):
            rates[r, k] = steps / secs
            comm.Barrier()
    per_rank = comm.gather(rates)
    ours.rt.free()
    if comm.Get_rank() != 0:
        return None
    # mean over ranks, then the median over rounds: a round that the machine's other work
    # slowed down (one rank losing its core for a while) does not decide the result
    bare, es = np.median(np.mean(per_rank, axis=0), axis=0)

    def med(col: str) -> float:
        return float(np.median([getattr(row, col) for row in ours.rows]))

    return {"job": name, "ranks": comm.Get_size(), "pairs": cfg.es.population,
            "evals": cfg.es.eval_episodes, "iterations": len(ours.rows), "bare": bare, "es": es,
            **{c: med(c) for c in ("iteration_seconds", "time_rollout", "time_comm",
                                   "time_update", "rollout_idle", "episode_length_mean")}}


def worker(args) -> None:
    import torch

    from es_mpi import comm as mpi

    torch.set_num_threads(1)
    comm = mpi.world()
    out = mpi.abort_on_exception(comm, lambda: [bench_job(comm, n, args) for n in args.jobs])
    if comm.Get_rank() == 0:
        Path(args.out).write_text(json.dumps(out))


def table(results: list[dict]) -> str:
    lines = ["| job | P | pairs (eval) | iteration s | rollout / exchange / update s | "
             "rollout idle | mean length | raw loop | es_mpi | es_mpi / raw |", "|---" * 10 + "|"]
    for r in sorted(results, key=lambda r: (r["job"], r["ranks"])):
        lines.append(
            f"| {r['job']} | {r['ranks']} | {r['pairs']} ({r['evals']}) | "
            f"{r['iteration_seconds']:.3f} | {r['time_rollout']:.3f} / {r['time_comm']:.3f} / "
            f"{r['time_update']:.3f} | {100 * r['rollout_idle']:.1f} % | "
            f"{r['episode_length_mean']:.0f} | {r['bare']:,.0f} | {r['es']:,.0f} | "
            f"{100 * r['es'] / r['bare']:.1f} % |")
    return "\n".join(lines)


def driver(args) -> None:
    """One `mpiexec -n P` per rank count; the table at the end."""
    from tqdm import tqdm

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in tqdm(args.ranks, desc="rank counts", file=sys.stderr):
            out = Path(tmp) / f"p{ranks}.json"
            cmd = ["mpiexec", "-n", str(ranks), sys.executable, __file__, "--worker",
                   "--out", str(out), "--jobs", ",".join(args.jobs), "--seconds",
                   str(args.seconds), "--rounds", str(args.rounds)]
            if args.pairs_per_rank:
                cmd += ["--pairs-per-rank", str(args.pairs_per_rank)]
            subprocess.run(cmd, check=True, cwd=REPO)
            results += json.loads(out.read_text())
    print(f"weak scaling, {args.rounds} alternating rounds of {args.seconds / args.rounds:.1f} s "
          "each (the raw loop replaying the training path's episodes, then es_mpi) per job and "
          "rank count; env steps per second per rank\n" + table(results),
          flush=True)
    worst = min(r["es"] / r["bare"] for r in results)
    print(f"lowest ratio {100 * worst:.1f} % (target >= 90 %): "
          f"{'PASS' if worst >= 0.9 else 'MISS'}", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", default=[1, 2], type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--jobs", default=["humanoid_mlp", "humanoid_dt"],
                   type=lambda s: s.split(","), help="names in bench/paper_jobs.py")
    p.add_argument("--seconds", type=float, default=25.0, help="per side, per job and P")
    p.add_argument("--rounds", type=int, default=5, help="alternating raw/es_mpi rounds")
    p.add_argument("--pairs-per-rank", type=int, default=None,
                   help="default: bench/paper_jobs.py PAIRS_PER_RANK")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    (worker if args.worker else driver)(args)


if __name__ == "__main__":
    main()
