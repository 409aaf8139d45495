"""Atari Hero: emulator frames per second per rank, es_mpi training path vs a bare ale-py loop.

    mpiexec -n 2 python bench/atari_throughput.py [--seconds 30] [--policies cnn,cnn-novbn,dt]

Bare loop: `ale_py.ALEInterface` driven directly (4 frames per action, max of the last two
greyscale screens, the same area resize, 4-frame stack) + the same policy's `act` at fixed
theta: no gymnasium, no ES, no perturbation (so no VBN re-statistics).
es_mpi path: real ES iterations (`iteration.run_iteration`) of the job with a small population:
perturbation (and the VBN reference forward it triggers), rollouts through `envs.make_env`,
Allgatherv, noise reconstruction and the update.
Frames = agent steps x frame_skip. Also run by `bench/throughput.py --suite hero`.
Also printed: the cost of one VBN re-statistics (reference batch forward) per theta change.
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
from es_mpi.envs_atari import AreaResize  # noqa: E402
from throughput import ESPath  # noqa: E402  (bench/, next to this script)

JOBS = {  # label -> (job file, extra overrides)
    "cnn": ("jobs/atari_hero_cnn.yaml", []),
    "cnn-novbn": ("jobs/atari_hero_cnn.yaml", ["policy.vbn=false"]),
    "dt": ("jobs/atari_hero.yaml", []),
}


class BareALE:
    """ALEInterface + inline preprocessing + policy.act; whole episodes up to max_frames."""

    def __init__(self, cfg, policy, seed: int):
        import ale_py
        from ale_py import roms
        self.ale = ale_py.ALEInterface()
        self.ale.setLoggerMode(ale_py.LoggerMode.Error)
        self.ale.setInt("random_seed", seed)
        self.ale.setFloat("repeat_action_probability", 0.0)
        self.ale.setInt("max_num_frames_per_episode", cfg.env.max_frames)
        self.ale.loadROM(roms.get_rom_path("hero"))
        self.actions = self.ale.getMinimalActionSet()
        self.policy, self.skip = policy, cfg.env.frame_skip
        self.resize = AreaResize(self.ale.getScreenDims(), 84)
        self.rng = np.random.default_rng(seed)

    def run(self, seconds: float) -> tuple[int, float]:
        ale, steps, start = self.ale, 0, time.perf_counter()
        a, b = np.empty((2, 210, 160), np.uint8)
        stack = np.empty((4, 84, 84), np.uint8)
        while time.perf_counter() - start < seconds:
            ale.reset_game()
            for _ in range(int(self.rng.integers(1, 31))):
                ale.act(self.actions[0])
            ale.getScreenGrayscale(a)
            stack[:] = self.resize(a)
            self.policy.reset(None)
            while not ale.game_over():
                act = self.actions[self.policy.act(stack)]
                r = 0.0
                for t in range(self.skip):
                    r += ale.act(act)
                    if t == self.skip - 2:
                        ale.getScreenGrayscale(b)
                ale.getScreenGrayscale(a)
                stack[:-1] = stack[1:]
                stack[-1] = self.resize(np.maximum(a, b))
                self.policy.observe(r)
                steps += 1
        return steps * self.skip, time.perf_counter() - start


def vbn_refresh_seconds(policy, repeats: int = 5) -> float:
    enc = next((m for m in policy.modules() if getattr(m, "vbn", False)), None)
    if enc is None:
        return float("nan")
    t0 = time.perf_counter()
    for _ in range(repeats):
        enc.refresh()
    return (time.perf_counter() - t0) / repeats


def bench(label: str, args, comm) -> None:
    job, extra = JOBS[label]
    cfg = load_job(REPO / job, [f"es.population={args.population}", "es.eval_episodes=0",
                                "es.noise_table_size=20000000", f"env.max_frames={args.max_frames}",
                                "run.dir=/tmp/es_mpi_atari_bench", *extra])
    ours = ESPath(cfg, comm, frames_per_step=cfg.env.frame_skip)
    bare_policy = ours.rt.policy  # same module; the bare loop keeps theta fixed
    bare_policy.set_theta(ours.state.theta)
    bare = BareALE(cfg, bare_policy, seed=1 + comm.Get_rank())
    totals = np.zeros(4)
    for _ in range(args.rounds):  # alternate, so drifting load hits both alike
        totals[:2] += bare.run(args.seconds / args.rounds)
        totals[2:] += ours.run(args.seconds / args.rounds)
    refresh = vbn_refresh_seconds(bare_policy)
    per_rank = comm.gather(totals)
    if comm.Get_rank() == 0:
        b = float(np.mean([t[0] / t[1] for t in per_rank]))
        o = float(np.mean([t[2] / t[3] for t in per_rank]))
        vbn = f"VBN batch {cfg.policy.vbn_batch}" if cfg.policy.vbn else "no VBN"
        print(f"Hero, {label} ({bare_policy.num_params:,} params, {vbn}), {comm.Get_size()} "
              f"rank(s), population {args.population}, cap {args.max_frames} frames, "
              f"{ours.iterations} ES iterations")
        print(f"  bare ale-py + forward : {b:8.0f} frames/s per rank ({b / 4:6.0f} steps/s)")
        print(f"  es_mpi training path  : {o:8.0f} frames/s per rank ({o / 4:6.0f} steps/s)")
        print(f"  ratio                 : {100 * o / b:8.1f} %")
        if cfg.policy.vbn:
            print(f"  VBN re-statistics     : {1e3 * refresh:8.1f} ms per theta change "
                  f"(= {refresh * b / 4:.0f} agent steps of the bare loop)")
        sys.stdout.flush()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=30.0, help="per policy, split in rounds")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--population", type=int, default=4, help="mirrored pairs per iteration")
    p.add_argument("--max-frames", type=int, default=4000,
                   help="episode frame cap (env.max_frames)")
    p.add_argument("--policies", default="cnn,cnn-novbn,dt")
    args = p.parse_args()
    torch.set_num_threads(1)
    comm = mpi.world()
    for label in args.policies.split(","):
        bench(label, args, comm)


if __name__ == "__main__":
    main()
