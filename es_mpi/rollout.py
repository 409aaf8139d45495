"""One episode of one (perturbed) policy; returns its return, length and optional obs sums."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .envs import LeanStep, lean_step


@dataclass
class Normalizer:
    """obs -> (obs - mean) / std as float32, clipped to ±clip unless clip is None; identity
    when mean is None."""

    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    clip: float | None = None

    def __post_init__(self):
        if self.mean is not None:
            self._mean = self.mean.astype(np.float32)
            self._inv_std = (1.0 / self.std).astype(np.float32)

    def __call__(self, obs: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The normalised observation, written into `out` (float32, obs's shape) if given:
        the same bits, without allocating."""
        if self.mean is None:
            return obs
        if out is None:
            x = (obs.astype(np.float32, copy=False) - self._mean) * self._inv_std
        else:  # dtype=float32 casts obs first, as astype above does
            x = np.subtract(obs, self._mean, out=out, dtype=np.float32, casting="same_kind")
            np.multiply(x, self._inv_std, out=x)
        return x if self.clip is None else np.clip(x, -self.clip, self.clip, out=x)


def make_normalizer(env_cfg, obs_stats) -> Normalizer:
    """The observation transform of an `EnvConfig` with the current `ObsStats`."""
    if not env_cfg.normalize_obs:
        return Normalizer()
    return Normalizer(obs_stats.mean, obs_stats.std(env_cfg.obs_var_floor), env_cfg.obs_clip)


def obs_squares(obs: np.ndarray, dtype, mode: str = "exact") -> np.ndarray:
    """The squares an observation adds to the statistics' sum of squares, in `dtype`: exact,
    or (mode uint8_wrap) np.square of the uint8 frame itself, which wraps modulo 256 as in
    Lorenc & Neruda's code (their frames are uint8 and NumPy squares in the array's dtype)."""
    if mode == "exact":
        return np.square(obs, dtype=dtype)
    if mode != "uint8_wrap":
        raise ValueError(f"unknown env.obs_squares {mode!r}")
    if obs.dtype != np.uint8:
        raise ValueError(f"env.obs_squares uint8_wrap needs uint8 observations, got {obs.dtype}")
    return np.square(obs).astype(dtype)


@dataclass
class EpisodeResult:
    ret: float
    length: int
    obs_sum: np.ndarray | None = None  # sum of raw observations (when recorded)
    obs_sumsq: np.ndarray | None = None
    obs_count: int = 0
    terminated: bool = False  # the env ended it (not the time limit, the cap or a truncation)


def run_episode(env, policy, seed: int, max_steps: int, normalize: Normalizer,
                record_obs: bool = False, target_return: float | None = None,
                episode_seed: int | None = None, action_noise_std: float = 0.0,
                lean: bool = True, squares: str = "exact") -> EpisodeResult:
    """Run `policy` in `env` from reset(seed) for at most `max_steps` steps.

    `episode_seed` seeds the episode's own randomness: the policy's (dropout, sampled actions)
    and the N(0, action_noise_std^2) noise added to continuous actions. `lean` steps the
    innermost env directly when gymnasium.make's wrappers are all the chain holds, ending the
    episode at the TimeLimit itself (envs.lean_step: the same episode, without two Python
    wrapper calls a step); False steps the wrapped env. `squares`: how recorded observations
    are squared (env.obs_squares, `obs_squares`).
    """
    obs, _ = env.reset(seed=int(seed))
    policy.reset(target_return, seed=episode_seed)
    noise_rng = None
    if action_noise_std > 0:
        if episode_seed is None:
            raise ValueError("action noise needs an episode_seed")
        noise_rng = np.random.Generator(np.random.PCG64([episode_seed, 0xAC7]))
    shortcut = lean_step(env) if lean else LeanStep(env.step, None)
    step, act, observe = shortcut.step, policy.act, policy.observe
    cap = max_steps if shortcut.limit is None else min(max_steps, shortcut.limit)
    total, steps, terminated = 0.0, 0, False
    s = ss = None
    if record_obs:  # integer frames sum exactly in int64; anything else in float64
        acc = np.int64 if np.issubdtype(obs.dtype, np.integer) else np.float64
        s, ss = np.zeros(obs.shape, dtype=acc), np.zeros(obs.shape, dtype=acc)
    buf = np.empty(np.shape(obs), dtype=np.float32)  # the normalised observation, reused
    while steps < cap:
        if record_obs:
            s += obs
            ss += obs_squares(obs, s.dtype, squares)
        action = act(normalize(obs, buf))
        if noise_rng is not None:
            action = action + noise_rng.standard_normal(np.shape(action), dtype=np.float32) \
                * np.float32(action_noise_std)
        obs, reward, terminated, truncated, _ = step(action)
        reward = float(reward)
        observe(reward)
        total += reward
        steps += 1
        if terminated or truncated:
            break
    return EpisodeResult(total, steps, s, ss, steps if record_obs else 0, bool(terminated))
