"""Image encoders for Atari policies (Nature-DQN sized), optionally with virtual batch norm."""
from __future__ import annotations

import torch
from torch import nn

from .vbn import VBNModule, VBNSequential, VirtualBatchNorm


class ConvEncoder(VBNModule):
    """(B, C, 84, 84) uint8/float frames -> (B, out_dim) features.

    Conv 32@8x8/4 -> 64@4x4/2 -> 64@3x3/1 (ReLU each), flatten 64*7*7, Linear -> out_dim.
    Pixels are scaled by 1/255 inside, so callers pass raw frames.
    With `vbn`, every conv and the projection are followed by virtual batch norm; the
    statistics come from a reference batch (`policies.vbn`) and are recomputed on the first
    forward after theta changes. The layers keep their biases (cancelled by the mean
    subtraction, so inert) so that enabling VBN only adds parameters, never renames them.
    """

    def __init__(self, in_channels: int = 4, out_dim: int = 512, vbn: bool = False):
        super().__init__()
        self.vbn = vbn
        self.init_vbn()
        norm = (lambda n: VirtualBatchNorm(n)) if vbn else (lambda n: nn.Identity())
        self.convs = VBNSequential(
            nn.Conv2d(in_channels, 32, 8, stride=4), norm(32), nn.ReLU(),  # 20x20
            nn.Conv2d(32, 64, 4, stride=2), norm(64), nn.ReLU(),  # -> 9x9
            nn.Conv2d(64, 64, 3, stride=1), norm(64), nn.ReLU(),  # -> 7x7
        )
        self.proj = nn.Linear(64 * 7 * 7, out_dim)
        self.proj_norm = norm(out_dim)

    def _forward(self, frames: torch.Tensor, update: bool = False) -> torch.Tensor:
        x = self.convs(frames.float() / 255.0, update).flatten(1)
        x = self.proj(x)
        return self.proj_norm(x, update) if self.vbn else x

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        if self.vbn and self._stale:
            self.refresh()
        return self._forward(frames)
