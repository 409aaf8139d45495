"""MLP policy: obs -> hidden... -> act (Salimans et al. 2017; Lorenc & Neruda 2025)."""
from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from .base import ActionHead, FlatPolicy


class MLPPolicy(FlatPolicy):
    """obs (obs_dim,) -> [Linear, act] x len(hidden) -> Linear (act_dim,) -> squash/argmax.

    Humanoid-v4 (376 obs, 17 act) with hidden [256, 256]: 166,673 parameters.
    """

    def __init__(self, obs_dim: int, action_space: gym.Space, hidden=(256, 256),
                 activation: str = "tanh"):
        super().__init__()
        self.head = ActionHead(action_space)
        act_fn = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]
        layers, width = [], obs_dim
        for h in hidden:
            layers += [nn.Linear(width, h), act_fn()]
            width = h
        layers.append(nn.Linear(width, self.head.size))
        self.net = nn.Sequential(*layers)
        self.finalize()

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)  # (..., obs_dim) -> (..., act_dim)

    def act(self, obs: np.ndarray):
        x = torch.from_numpy(np.asarray(obs, dtype=np.float32).reshape(-1))
        return self.head(self.net(x))
