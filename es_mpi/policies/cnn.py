"""Nature-DQN policy for image observations (Mnih et al. 2015), trained by ES.

frames (4, 84, 84) -> ConvEncoder -> 512 -> ReLU -> Linear (n_actions) -> argmax or a sample.
Hero (18 actions): 1,693,362 parameters; 1,694,706 with virtual batch norm.
"""
from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from .base import ActionHead, FlatPolicy
from .encoders import ConvEncoder


class CNNPolicy(FlatPolicy):
    def __init__(self, obs_shape: tuple, action_space: gym.Space, hidden: int = 512,
                 vbn: bool = False, discrete_action: str = "argmax", pixel_scale: float = 1 / 255):
        super().__init__()
        if len(obs_shape) != 3:
            raise ValueError(f"policy.kind 'cnn' needs image observations (C, H, W), "
                             f"got shape {obs_shape}")
        self.head = ActionHead(action_space, discrete=discrete_action)
        if not self.head.discrete:
            raise ValueError("policy.kind 'cnn' needs a discrete action space")
        self.encoder = ConvEncoder(obs_shape[0], hidden, vbn=vbn, pixel_scale=pixel_scale)
        self.out = nn.Linear(hidden, self.head.size)
        self.finalize()

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.encoder(frames)))  # (B, C, 84, 84) -> (B, n_actions)

    def act(self, obs: np.ndarray) -> int:
        return self.head(self.forward(torch.from_numpy(obs)[None])[0], self.generator)
