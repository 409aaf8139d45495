"""One episode of one (perturbed) policy; returns its return, length and optional obs sums."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Normalizer:
    """obs -> clip((obs - mean) / std, -clip, clip) as float32; identity when mean is None."""

    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    clip: float = 5.0

    def __post_init__(self):
        if self.mean is not None:
            self._mean = self.mean.astype(np.float32)
            self._inv_std = (1.0 / self.std).astype(np.float32)

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        if self.mean is None:
            return obs
        x = (obs.astype(np.float32, copy=False) - self._mean) * self._inv_std
        return np.clip(x, -self.clip, self.clip, out=x)


@dataclass
class EpisodeResult:
    ret: float
    length: int
    obs_sum: np.ndarray | None = None  # sum of raw observations (when recorded)
    obs_sumsq: np.ndarray | None = None
    obs_count: int = 0


def run_episode(env, policy, seed: int, max_steps: int, normalize: Normalizer,
                record_obs: bool = False, target_return: float | None = None) -> EpisodeResult:
    """Run `policy` in `env` from reset(seed) for at most `max_steps` steps."""
    obs, _ = env.reset(seed=int(seed))
    policy.reset(target_return)
    total, steps = 0.0, 0
    s = ss = None
    if record_obs:
        s = np.zeros(obs.shape, dtype=np.float64)
        ss = np.zeros(obs.shape, dtype=np.float64)
    while steps < max_steps:
        if record_obs:
            s += obs
            ss += np.square(obs, dtype=np.float64)
        obs, reward, terminated, truncated, _ = env.step(policy.act(normalize(obs)))
        policy.observe(float(reward))
        total += float(reward)
        steps += 1
        if terminated or truncated:
            break
    return EpisodeResult(total, steps, s, ss, steps if record_obs else 0)
