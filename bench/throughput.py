"""Env steps per second per rank: the es_mpi training path vs a bare env+policy loop.

    mpiexec -n 2 python bench/throughput.py [--seconds 20] [--population 8]
    mpiexec -n 2 python bench/throughput.py --suite hero     # Atari Hero (bench/atari_throughput.py)
    mpiexec -n 2 python bench/throughput.py --suite all

Bare loop: env.step + the same MLP forward (torch, one thread), no ES, no normalisation.
es_mpi path: real ES iterations (`iteration.run_iteration`: perturbation, normalisation, rollouts,
Allgatherv, noise reconstruction and the update) on jobs/humanoid_mlp.yaml, small population.
Both run on every rank at once, so the per-rank numbers include the contention of the others.
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
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from es_mpi import comm as mpi  # noqa: E402
from es_mpi.config import load_job  # noqa: E402
from es_mpi.envs import make_env  # noqa: E402
from es_mpi.policies import make_policy  # noqa: E402
from es_mpi.iteration import n_eval_items, run_iteration  # noqa: E402
from es_mpi.runtime import build_runtime, initial_state, prepare_vbn  # noqa: E402


class BareLoop:
    """env.step + the same MLP forward, whole episodes, nothing else."""

    def __init__(self, cfg, seed: int):
        self.env = make_env(cfg.env)
        self.policy = make_policy(cfg.policy, self.env.observation_space,
                                  self.env.action_space, cfg.run.seed)
        self.seed = seed

    def run(self, seconds: float) -> tuple[int, float]:
        head, net = self.policy.head, self.policy.net
        steps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            obs, _ = self.env.reset(seed=self.seed)
            self.seed += 1
            done = False
            while not done:
                out = net(torch.from_numpy(obs.astype(np.float32)))
                obs, _, term, trunc, _ = self.env.step(head(out))  # the job's action mapping
                steps += 1
                done = term or trunc
        return steps, time.perf_counter() - start


class ESPath:
    """Whole ES iterations (`iteration.run_iteration`): rollout + Allgatherv + update, after
    `warmup` iterations (the first has no episode cap and no statistics yet).

    `step` runs one iteration, keeps its results row in `rows` and returns its env steps, the
    evaluation episodes' included; `run` iterates for a while and returns this rank's share of
    the env steps (times `frames_per_step`: frame skip for Atari) and the seconds they took.
    """

    def __init__(self, cfg, comm, frames_per_step: int = 1, warmup: int = 1):
        self.cfg, self.comm, self.frames_per_step = cfg, comm, frames_per_step
        self.rt = build_runtime(cfg, comm)
        self.state = initial_state(self.rt)
        prepare_vbn(cfg, comm, self.rt, self.state)
        for _ in range(warmup):
            self.state, _ = run_iteration(cfg, comm, self.rt, self.state)
        self.n_eval = n_eval_items(cfg)
        self.rows = []

    @property
    def iterations(self) -> int:
        return len(self.rows)

    def step(self) -> int:
        before = self.state.timesteps
        self.state, row = run_iteration(self.cfg, self.comm, self.rt, self.state)
        self.rows.append(row)
        evals = int(round(row.eval_length * self.n_eval)) if self.n_eval else 0
        return self.state.timesteps - before + evals

    def run(self, seconds: float) -> tuple[int, float]:
        steps, start = 0, time.perf_counter()
        while True:
            steps += self.step()
            # all ranks stop after the same iteration
            if mpi.any_rank(self.comm, time.perf_counter() - start >= seconds):
                break
        share = steps * self.frames_per_step // self.comm.Get_size()
        return share, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--job", default=str(REPO / "jobs/humanoid_mlp.yaml"))
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--population", type=int, default=8, help="mirrored pairs per iteration")
    p.add_argument("--rounds", type=int, default=5, help="alternating bare/ES measurement rounds")
    p.add_argument("--suite", choices=("humanoid", "hero", "all"), default="humanoid",
                   help="hero/all: also Atari Hero frames/s (CNN, CNN without VBN, DT)")
    args = p.parse_args()
    torch.set_num_threads(1)
    comm = mpi.world()
    if args.suite in ("hero", "all"):
        import atari_throughput  # bench/, next to this script

        hero_args = argparse.Namespace(seconds=30.0, rounds=3, population=4, max_frames=4000)
        for label in atari_throughput.JOBS:
            atari_throughput.bench(label, hero_args, comm)
        if args.suite == "hero":
            return
    cfg = load_job(args.job, [f"es.population={args.population}", "es.noise_table_size=20000000",
                              "es.eval_episodes=0", "run.dir=/tmp/es_mpi_bench"])
    bare, ours = BareLoop(cfg, seed=10_000 * comm.Get_rank()), ESPath(cfg, comm)
    totals = np.zeros(4)  # bare steps, bare seconds, es steps, es seconds
    for _ in range(args.rounds):  # alternate, so drifting machine load hits both alike
        totals[:2] += bare.run(args.seconds / args.rounds)
        totals[2:] += ours.run(args.seconds / args.rounds)
    per_rank = comm.gather(totals)
    if comm.Get_rank() == 0:
        b = float(np.mean([t[0] / t[1] for t in per_rank]))
        o = float(np.mean([t[2] / t[3] for t in per_rank]))
        print(f"{cfg.env.id}, MLP {cfg.policy.hidden}, {comm.Get_size()} rank(s), population "
              f"{args.population} pairs, {ours.iterations} ES iterations")
        print(f"bare env.step + forward : {b:8.0f} steps/s per rank")
        print(f"es_mpi training path    : {o:8.0f} steps/s per rank")
        print(f"ratio                   : {100 * o / b:8.1f} %")


if __name__ == "__main__":
    main()
