"""Environment makers. Gymnasium ids (MuJoCo, classic control) are made here; `ALE/...` ids
go to `envs_atari` (the paper's Atari preprocessing)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import gymnasium as gym
from gymnasium.wrappers import OrderEnforcing, PassiveEnvChecker, TimeLimit

from .config import ConfigError

# Wrappers of gymnasium.make whose per-step work a rollout may skip: they only check the
# order of calls (reset before step) and the spaces. TimeLimit is replayed by the rollout.
CHECK_ONLY_WRAPPERS = (OrderEnforcing, PassiveEnvChecker)


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


@dataclass(frozen=True)
class LeanStep:
    """How a rollout steps an env: `step` is the innermost env's own step when every wrapper
    above it is a TimeLimit or a checking wrapper (CHECK_ONLY_WRAPPERS), else the env's own
    step. `limit` is then the smallest TimeLimit's step count, at which the rollout must end
    the episode as truncated itself (None: no TimeLimit was skipped)."""

    step: Callable
    limit: int | None


def lean_step(env) -> LeanStep:
    """The per-step shortcut for `env` (see LeanStep). Reset still goes through `env`, so
    the wrappers' own bookkeeping is right at the start of every episode. Any wrapper not
    known here (Atari preprocessing, a recorder, a user's) keeps the whole wrapped step."""
    limit, inner = None, env
    while isinstance(inner, gym.Wrapper):
        kind = type(inner)  # exact types: a subclass may do more per step
        if kind is TimeLimit:
            steps = int(inner._max_episode_steps)
            limit = steps if limit is None else min(limit, steps)
        elif kind not in CHECK_ONLY_WRAPPERS:
            return LeanStep(env.step, None)
        inner = inner.env
    return LeanStep(inner.step, limit)
