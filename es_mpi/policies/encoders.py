"""Image encoders for Atari policies (Nature-DQN sized), optionally with virtual batch norm."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .vbn import VBNModule, VBNSequential, VirtualBatchNorm


def frame_scale(cfg, obs_normalized: bool) -> float:
    """What image encoders multiply frames by: policy.frame_scale, or by default 1/255 for raw
    uint8 frames and 1 for frames the run normalises per pixel."""
    if cfg.frame_scale is not None:
        return float(cfg.frame_scale)
    return 1.0 if obs_normalized else 1 / 255


class ConvEncoder(VBNModule):
    """(B, C, 84, 84) uint8/float frames -> (B, out_dim) features.

    Conv 32@8x8/4 -> 64@4x4/2 -> 64@3x3/1 (ReLU each), flatten 64*7*7, Linear -> out_dim.
    Pixels are multiplied by `pixel_scale` inside: 1/255 for raw uint8 frames, 1 for frames
    the run already normalises per pixel (env.normalize_obs).
    With `vbn`, every conv and the projection are followed by virtual batch norm; the
    statistics come from a reference batch (`policies.vbn`) and are recomputed on the first
    forward after theta changes. The layers keep their biases (cancelled by the mean
    subtraction, so inert) so that enabling VBN only adds parameters, never renames them.
    """

    def __init__(self, in_channels: int = 4, out_dim: int = 512, vbn: bool = False,
                 pixel_scale: float = 1 / 255):
        super().__init__()
        self.vbn, self.pixel_scale = vbn, pixel_scale
        self.init_vbn()
        norm = (lambda n: VirtualBatchNorm(n)) if vbn else (lambda n: nn.Identity())
        self.convs = VBNSequential(
            nn.Conv2d(in_channels, 32, 8, stride=4), norm(32), nn.ReLU(),  # -> (B, 32, 20, 20)
            nn.Conv2d(32, 64, 4, stride=2), norm(64), nn.ReLU(),  # -> (B, 64, 9, 9)
            nn.Conv2d(64, 64, 3, stride=1), norm(64), nn.ReLU(),  # -> (B, 64, 7, 7)
        )
        self.proj = nn.Linear(64 * 7 * 7, out_dim)
        self.proj_norm = norm(out_dim)
        self._folded: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _forward(self, frames: torch.Tensor, update: bool = False) -> torch.Tensor:
        """Layer by layer; with `update`, the VBN layers take this batch's statistics."""
        x = self.convs(frames.float() * self.pixel_scale, update).flatten(1)
        x = self.proj(x)
        return self.proj_norm(x, update) if self.vbn else x

    def refresh(self) -> None:
        """New VBN statistics, then fold each VBN affine map into the layer before it, so a
        step costs what it costs without VBN: W' = W * scale, b' = b * scale + shift."""
        super().refresh()
        pairs = [(self.convs[i], self.convs[i + 1]) for i in (0, 3, 6)]
        pairs.append((self.proj, self.proj_norm))
        self._folded = []
        for layer, norm in pairs:
            shape = (-1,) + (1,) * (layer.weight.dim() - 1)
            self._folded.append((layer.weight * norm.scale.view(shape),
                                 layer.bias * norm.scale + norm.shift))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        if self.vbn and self._stale:
            self.refresh()
        convs = (self.convs[0], self.convs[3], self.convs[6])
        layers = self._folded if self.vbn else [(m.weight, m.bias) for m in convs + (self.proj,)]
        x = frames.float() * self.pixel_scale
        for (w, b), conv in zip(layers, convs):
            x = F.relu(F.conv2d(x, w, b, stride=conv.stride))
        w, b = layers[3]
        return F.linear(x.flatten(1), w, b)
