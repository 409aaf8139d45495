"""What Lorenc & Neruda's Atari DT input is on real Hero frames (docs/fidelity.md, "Atari input").

    python bench/atari_input.py [--steps 2000] [--episode-steps 500]

Uniformly random play of ALE/Hero-v5 through jobs/atari_hero.yaml's pipeline, every step's
(4, 84, 84) observation recorded. Prints, for the per-pixel statistics of these observations:
the share of pixels whose std is at the 0.1 floor and the mean |input| = |x - mean| / std, with
the authors' uint8 squares (env.obs_squares uint8_wrap) and with exact squares; the std their
training episodes used after the float32 round trip of their `copy_from` (VirtualBatch-
NormalizationStats.set); and how often the two pooling orders (env.pool_order) give other pixels.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from es_mpi.config import load_job  # noqa: E402
from es_mpi.envs import make_env  # noqa: E402
from es_mpi.envs_atari import max_then_resize, resize_then_max  # noqa: E402
from es_mpi.es import ObsStats  # noqa: E402
from es_mpi.rollout import obs_squares  # noqa: E402


def random_play(steps: int, episode_steps: int, seed: int = 0):
    """(observations (S, 4, 84, 84) uint8, pooled-frame pairs: share of differing pixels and
    mean |difference| between the pooling orders per step)."""
    env = make_env(load_job(REPO / "jobs/atari_hero.yaml").env)
    rng = np.random.default_rng(seed)
    obs_all, differ, gap = [], [], []
    episode = 0
    while len(obs_all) < steps:
        obs, _ = env.reset(seed=episode)
        episode += 1
        for _ in range(episode_steps):
            obs_all.append(obs)
            obs, _, term, trunc, _ = env.step(int(rng.integers(env.action_space.n)))
            a, b = env.screens
            one = resize_then_max(a, b, env.resize).astype(np.int16)
            two = max_then_resize(a, b, env.resize).astype(np.int16)
            differ.append(np.mean(one != two))
            gap.append(np.abs(one - two).max())
            if term or trunc or len(obs_all) >= steps:
                break
    return np.stack(obs_all), np.array(differ), np.array(gap), episode


def stats_of(obs: np.ndarray, mode: str) -> ObsStats:
    stats = ObsStats.empty(obs.shape[1:])
    sq = sum(obs_squares(o, np.int64, mode) for o in obs)
    stats.add(obs.sum(0, dtype=np.int64).astype(np.float64), sq.astype(np.float64), len(obs))
    return stats


def authors_round_trip_std(stats: ObsStats) -> np.ndarray:
    """The std a worker's test model used: mean and std in float32 from the sums, written back
    as sums (mean * n, (mean^2 + std^2) * n) by `set`, and the std recomputed from them."""
    n = np.float32(stats.count)
    s, ss = stats.sum.astype(np.float32), stats.sumsq.astype(np.float32)
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - np.square(mean), np.float32(0.01)))
    s2, ss2 = mean * n, (np.square(mean) + np.square(std)) * n
    mean2 = s2 / n
    return np.sqrt(np.maximum(ss2 / n - np.square(mean2), np.float32(0.01)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--episode-steps", type=int, default=500)
    args = p.parse_args()
    obs, differ, gap, episodes = random_play(args.steps, args.episode_steps)
    print(f"{len(obs)} observations of random play, {episodes} episodes "
          f"(at most {args.episode_steps} steps each)")
    for mode in ("uint8_wrap", "exact"):
        st = stats_of(obs, mode)
        std = st.std(0.01)
        x = np.abs((obs.astype(np.float64) - st.mean) / std)
        print(f"{mode:>10}: std at the 0.1 floor for {np.mean(std == 0.1):.2%} of pixels, "
              f"median std {np.median(std):.3g}; mean |input| {x.mean():.3g}, "
              f"99th percentile {np.percentile(x, 99):.3g}")
        if mode == "uint8_wrap":
            rt = authors_round_trip_std(st)
            print(f"{'':>10}  after the authors' float32 round trip: std mean {rt.mean():.4f}, "
                  f"max {rt.max():.4f}, at 0.1 for {np.mean(rt == np.float32(0.1)):.2%}")
    print(f"pool order: frames differ on {np.mean(differ > 0):.1%} of steps, "
          f"{differ.mean():.3%} of pixels, by at most {gap.max()} grey levels")


if __name__ == "__main__":
    main()
