"""Image encoders for Atari policies (Nature-DQN sized)."""
from __future__ import annotations

import torch
from torch import nn


class ConvEncoder(nn.Module):
    """(B, C, 84, 84) uint8/float frames -> (B, out_dim) features.

    Conv 32@8x8/4 -> 64@4x4/2 -> 64@3x3/1 (ReLU each), flatten 64*7*7, Linear -> out_dim.
    Pixels are scaled by 1/255 inside, so callers pass raw frames.
    """

    def __init__(self, in_channels: int = 4, out_dim: int = 512):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, 32, 8, stride=4), nn.ReLU(),  # -> (B, 32, 20, 20)
            nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),  # -> (B, 64, 9, 9)
            nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(),  # -> (B, 64, 7, 7)
        )
        self.proj = nn.Linear(64 * 7 * 7, out_dim)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames.float() / 255.0
        return self.proj(self.convs(x).flatten(1))
