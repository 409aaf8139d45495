"""Environment makers. Gymnasium ids (MuJoCo, classic control) are made here; `ALE/...` ids
go to `envs_atari` (the paper's Atari preprocessing)."""
from __future__ import annotations

import warnings

import gymnasium as gym

from .config import ConfigError


def make_env(cfg, render_mode: str | None = None) -> gym.Env:
    """Build the environment of an `EnvConfig` (no passive checker: it costs time per step)."""
    from .envs_atari import is_atari, make_atari_env
    if is_atari(cfg.id):
        return make_atari_env(cfg, render_mode)
    kwargs = dict(cfg.kwargs)
    if cfg.max_episode_steps is not None:
        kwargs["max_episode_steps"] = cfg.max_episode_steps
    if render_mode is not None:
        kwargs["render_mode"] = render_mode
    try:
        with warnings.catch_warnings():
            # Humanoid-v4 is deprecated upstream but is the paper's environment (376-dim obs)
            warnings.filterwarnings("ignore", message=".*is out of date", category=DeprecationWarning)
            return gym.make(cfg.id, disable_env_checker=True, **kwargs)
    except gym.error.Error as exc:
        raise ConfigError(f"env.id: cannot make environment {cfg.id!r}: {exc}") from None
    except TypeError as exc:  # an unknown keyword in env.kwargs
        raise ConfigError(f"env.kwargs: {cfg.id!r} rejected them: {exc}") from None


def episode_limit(env: gym.Env) -> int:
    """The env's own step limit (TimeLimit, or the Atari frame cap in agent steps), or a large
    default when it has none."""
    try:
        return int(env.get_wrapper_attr("max_agent_steps"))
    except AttributeError:
        pass
    spec = env.spec
    if spec is not None and spec.max_episode_steps:
        return int(spec.max_episode_steps)
    return 100_000
