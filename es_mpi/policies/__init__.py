"""Policy registry: `make_policy` builds the module named by `policy.kind`."""
from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch

from .base import FlatPolicy, flatten_parameters
from .encoders import frame_scale


def make_policy(cfg, observation_space: gym.Space, action_space: gym.Space,
                seed: int, obs_normalized: bool = False) -> FlatPolicy:
    """Build the policy of a `PolicyConfig`; its initial theta is a function of `seed` only.

    `obs_normalized` (the job's env.normalize_obs): image policies then take float frames
    normalised per pixel instead of raw uint8 frames they scale by 1/255 themselves.
    """
    torch.manual_seed(seed)
    if getattr(cfg, "vbn", False) and len(observation_space.shape) != 3:
        raise ValueError("policy.vbn: virtual batch norm needs image observations (Atari)")
    if cfg.kind == "mlp":
        from .mlp import MLPPolicy
        obs_dim = int(np.prod(observation_space.shape))
        return MLPPolicy(obs_dim, action_space, hidden=cfg.hidden, activation=cfg.activation,
                         action_mapping=cfg.action_mapping, discrete_action=cfg.discrete_action,
                         init=cfg.init, action_bins=cfg.action_bins)
    if cfg.kind == "cnn":
        from .cnn import CNNPolicy
        return CNNPolicy(observation_space.shape, action_space, vbn=cfg.vbn,
                         discrete_action=cfg.discrete_action,
                         pixel_scale=frame_scale(cfg, obs_normalized))
    if cfg.kind == "dt":
        if len(observation_space.shape) == 3:  # image frames (C, H, W): the Atari DT
            from .dt_atari import make_atari_dt
            return make_atari_dt(cfg, observation_space, action_space, obs_normalized)
        from .dt import make_dt
        return make_dt(cfg, observation_space, action_space)
    raise ValueError(f"policy.kind: unknown policy {cfg.kind!r}")


__all__ = ["FlatPolicy", "flatten_parameters", "make_policy"]
