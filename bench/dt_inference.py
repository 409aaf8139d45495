"""Milliseconds per environment step of the Humanoid-v4 Decision Transformer, one thread.

    python bench/dt_inference.py [--steps 1000] [--repeats 3]

Paths compared (same weights, same observation stream of one 1000-step episode):
  naive     what Chen et al.'s get_action does every step: keep the history in lists, rebuild
            the last-K tensors (stack, pad-free) and run the whole window through the modules
  full      policy.inference=full: rolling preallocated buffers, whole window through modules
  window    policy.inference=window: exact, cached tokens + block-0 q/k/v, last block for s_t
  kv_cache  policy.inference=kv_cache: streaming attention, 3 new tokens per step
  + dropout full / window with policy.dropout=0.1 (jobs/humanoid_dt.yaml): cached tokens, the
            window with fresh masks every step, lean (policies.dt.DropoutWindow, the default)
            and through the GPT modules (the reference it is bitwise equal to)
and, for scale, one Humanoid-v4 env step. Both wall-clock and process CPU time are reported
(CPU time is steadier on a shared machine). Numbers go to docs/performance.md by hand.
"""
from __future__ import annotations

import os  # noqa: F401

from es_mpi.determinism import pin_cpu_kernels

pin_cpu_kernels()  # as es_mpi.run: one thread per rank, the same CPU kernels

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from es_mpi.config import PolicyConfig  # noqa: E402
from es_mpi.policies import make_policy  # noqa: E402


def record_observations(steps: int, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """A Humanoid-v4 trajectory (no termination) and the env's own cost per step (ms)."""
    env = gym.make("Humanoid-v4", disable_env_checker=True, terminate_when_unhealthy=False)
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    out, rewards = [], []
    t0 = time.process_time()
    for _ in range(steps):
        out.append(obs.astype(np.float32))
        obs, r, *_ = env.step(rng.uniform(-0.4, 0.4, 17).astype(np.float32))
        rewards.append(r)
    env_ms = 1000 * (time.process_time() - t0) / steps
    return np.array(out) / 10, np.array(rewards), env_ms


class NaivePolicy:
    """Chen et al.'s evaluation loop: lists of the history, rebuilt into tensors every step."""

    def __init__(self, policy):
        self.p = policy

    def reset(self, target):
        self.r = [target * self.p.rtg_scale]
        self.s, self.a, self.t = [], [], []

    @torch.inference_mode()
    def act(self, obs):
        K = self.p.context
        self.s.append(obs)
        self.a.append(np.zeros(17, np.float32))
        self.t.append(len(self.t))
        out = self.p.model(torch.tensor([self.r[-K:]], dtype=torch.float32),
                           torch.tensor(np.array(self.s[-K:]))[None],
                           torch.tensor(np.array(self.a[-K:]))[None],
                           torch.tensor([self.t[-K:]]))[0, -1]
        action = self.p.head(out)
        self.a[-1] = action
        return action

    def observe(self, reward):
        self.r.append(self.r[-1] - reward * self.p.rtg_scale)


def time_policy(policy, obs: np.ndarray, rewards: np.ndarray, repeats: int) -> tuple[float, float]:
    """Best-of-repeats (wall ms, CPU ms) per step over the whole episode."""
    walls, cpus = [], []
    for _ in range(repeats):
        policy.reset(6000.0)
        w0, c0 = time.perf_counter(), time.process_time()
        for o, r in zip(obs, rewards):
            policy.act(o)
            policy.observe(float(r))
        walls.append(1000 * (time.perf_counter() - w0) / len(obs))
        cpus.append(1000 * (time.process_time() - c0) / len(obs))
    return min(walls), min(cpus)


def time_in_env_loop(policy, steps: int, seed: int) -> float:
    """CPU ms of act() alone while a real Humanoid-v4 episode runs between the calls (the env
    step evicts caches, as in an ES rollout)."""
    env = gym.make("Humanoid-v4", disable_env_checker=True, terminate_when_unhealthy=False)
    obs, _ = env.reset(seed=seed)
    policy.reset(6000.0)
    spent = 0.0
    for _ in range(steps):
        c0 = time.process_time()
        action = policy.act((obs / 10).astype(np.float32))
        spent += time.process_time() - c0
        obs, reward, *_ = env.step(action)
        policy.observe(float(reward))
    return 1000 * spent / steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    obs, rewards, env_ms = record_observations(args.steps, 0)
    space = gym.make("Humanoid-v4", disable_env_checker=True)
    rows = []
    paths = [("naive", "full", 0.0), ("full", "full", 0.0), ("window", "window", 0.0),
             ("kv_cache", "kv_cache", 0.0),  # and the paper job's: dropout 0.1 in rollouts
             ("full + dropout 0.1", "full", 0.1), ("window + dropout 0.1", "window", 0.1),
             ("window + dropout 0.1, GPT modules", "window", 0.1)]
    for name, mode, dropout in paths:
        policy = make_policy(PolicyConfig(kind="dt", inference=mode, dropout=dropout),
                             space.observation_space, space.action_space, 0)
        if name.endswith("GPT modules"):  # the reference the lean dropout window equals
            policy._window_step_dropout = policy._window_step_modules
        rng = np.random.default_rng(1)
        theta = policy.get_theta()
        policy.set_theta((theta + 0.02 * rng.standard_normal(theta.size)).astype(np.float32))
        runner = NaivePolicy(policy) if name == "naive" else policy
        rows.append((name, *time_policy(runner, obs, rewards, args.repeats),
                     time_in_env_loop(runner, args.steps, 0)))
    print(f"Humanoid-v4 DT ({policy.num_params:,} parameters), {args.steps}-step episode, "
          f"1 thread, best of {args.repeats}; torch {torch.__version__}")
    print("| path | wall ms/step | CPU ms/step | vs naive (CPU) | CPU ms/step between env "
          "steps |\n|---|---|---|---|---|")
    base = rows[0][2]
    for name, wall, cpu, in_env in rows:
        print(f"| {name} | {wall:.3f} | {cpu:.3f} | {base / cpu:.1f}x | {in_env:.3f} |")
    print(f"| Humanoid-v4 env step (for scale) | | {env_ms:.3f} | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
