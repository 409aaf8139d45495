"""MLP policy: obs -> hidden... -> act (Salimans et al. 2017; Lorenc & Neruda 2025)."""
from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from .base import ActionHead, FlatPolicy


def normc_(weight: torch.Tensor, std: float) -> None:
    """OpenAI's normc initialiser: N(0, 1) rows scaled to norm `std` (one row per output unit,
    the columns of their TF (in, out) matrices)."""
    with torch.no_grad():
        w = torch.randn(weight.shape)
        weight.copy_(w * (std / w.square().sum(dim=1, keepdim=True).sqrt()))


class MLPPolicy(FlatPolicy):
    """obs (obs_dim,) -> [Linear, act] x len(hidden) -> Linear (act_dim,) -> ActionHead.

    init "torch": PyTorch's default Linear init (Lorenc & Neruda); "normc": OpenAI's, normc(1)
    hidden layers, normc(0.01) output layer, zero biases. The count is `num_params`.
    """

    def __init__(self, obs_dim: int, action_space: gym.Space, hidden=(256, 256),
                 activation: str = "tanh", action_mapping: str = "tanh",
                 discrete_action: str = "argmax", init: str = "torch"):
        super().__init__()
        self.head = ActionHead(action_space, action_mapping, discrete_action)
        act_fn = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]
        layers, width = [], obs_dim
        for h in hidden:
            layers += [nn.Linear(width, h), act_fn()]
            width = h
        layers.append(nn.Linear(width, self.head.size))
        self.net = nn.Sequential(*layers)
        if init == "normc":
            linears = [m for m in self.net if isinstance(m, nn.Linear)]
            for i, lin in enumerate(linears):
                normc_(lin.weight, 0.01 if i == len(linears) - 1 else 1.0)
                nn.init.zeros_(lin.bias)
        elif init != "torch":
            raise ValueError(f"policy.init: unknown init {init!r}")
        self.finalize()

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)  # (..., obs_dim) -> (..., act_dim)

    def act(self, obs: np.ndarray):
        x = torch.from_numpy(np.asarray(obs, dtype=np.float32).reshape(-1))
        return self.head(self.net(x), self.generator)
