"""Behaviour-cloning speed: gradient steps per second of es_mpi.pretrain for a job's policy at
its family's default batch size, on a synthetic Minari dataset with the job's spaces.

    python bench/pretrain.py jobs/humanoid_dt.yaml --threads 1 2 --steps 20
    python bench/pretrain.py jobs/atari_hero.yaml --threads 2 --steps 3 --set batch_size=16

Rounds alternate over the thread counts (one warm-up step each, not timed) and print the
median steps/s per count. The numbers are in docs/performance.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def synthetic_dataset(path: Path, env, episodes: int, length: int, seed: int = 0) -> None:
    """Random observations and actions in the env's spaces, rewards 1 (no env steps)."""
    from es_mpi.demos import DatasetWriter, Episode

    rng = np.random.default_rng(seed)
    obs_space, act_space = env.observation_space, env.action_space
    writer = DatasetWriter(path, obs_space, act_space, metadata={"description": "bench"})
    for _ in range(episodes):
        if obs_space.dtype == np.uint8:
            obs = rng.integers(0, 256, (length + 1, *obs_space.shape), dtype=np.uint8)
        else:
            obs = rng.standard_normal((length + 1, *obs_space.shape))
        acts = (rng.integers(0, act_space.n, length) if hasattr(act_space, "n")
                else rng.uniform(act_space.low, act_space.high, (length, *act_space.shape))
                .astype(act_space.dtype))
        writer.add([Episode(obs, acts, np.ones(length), np.zeros(length, bool),
                            np.r_[np.zeros(length - 1, bool), True])])
    writer.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("job")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--threads", type=int, nargs="+", default=[1])
    p.add_argument("--steps", type=int, default=20, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--episodes", type=int, default=8)
    p.add_argument("--length", type=int, default=200)
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()

    import torch

    from es_mpi import pretrain as P
    from es_mpi.config import load_job
    from es_mpi.envs import make_env

    env = make_env(load_job(args.job, args.overrides).env)
    with tempfile.TemporaryDirectory() as tmp:  # the dataset is in memory once loaded
        synthetic_dataset(Path(tmp) / "demos", env, args.episodes, args.length)
        a = P.parse_args([args.job, *args.overrides, "--data", str(Path(tmp) / "demos"),
                          "--steps", "1", "--out", str(Path(tmp) / "x.h5"),
                          *sum((["--set", s] for s in args.set), [])])
        job = P.setup(a)
    opt, sched = P.make_optimizer(job.policy, job.settings)
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    rates: dict[int, list[float]] = {n: [] for n in args.threads}
    with job.policy.trainable():
        for _ in range(args.rounds):
            for n in args.threads:
                torch.set_num_threads(n)
                draw = lambda: P.draw_batch(rng, job.corpus, job.corpus.train,  # noqa: E731
                                            job.settings, job.policy, job.dt)
                P.gradient_step(job, draw(), gen, opt, sched)  # warm-up
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    P.gradient_step(job, draw(), gen, opt, sched)
                rates[n].append(args.steps / (time.perf_counter() - t0))
    print(f"{args.job}: {job.policy.num_params:,} parameters, batch {job.settings.batch_size}"
          f"{f', context {job.policy.context}' if job.dt else ''}")
    for n, r in rates.items():
        print(f"  threads {n}: {statistics.median(r):8.2f} steps/s  "
              f"({statistics.median(r) * job.settings.batch_size:,.0f} windows/s; rounds "
              f"{', '.join(f'{x:.2f}' for x in r)})")


if __name__ == "__main__":
    main()
