"""Virtual batch normalisation (Salimans et al. 2016; used for Atari ES in Salimans et al. 2017).

Batch norm whose statistics come from a fixed *reference batch* of observations chosen once
at the start of a run, instead of from the current minibatch. With ES the network weights
change every episode (theta + sigma*eps), so the statistics are those of the reference batch
pushed through the *current* parameters: they are recomputed once after each change of theta
(one batched forward of the reference batch), then every step uses them as a fixed affine map.

Design choices (documented, since the papers leave them open):
- statistics from the reference batch alone (no mixing-in of the current example);
- per-channel statistics over (batch, height, width) after a conv, per-feature after a linear;
- a learnable scale (init 1) and shift (init 0) per channel, part of theta like any
  parameter, so ES perturbs them too (the bias of the layer before is kept but inert).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

EPS = 1e-5
EXTRAS_KEY = "vbn_reference"  # name of the reference batch in TrainState.extras / checkpoints


class VirtualBatchNorm(nn.Module):
    """y = x * scale + shift, with scale/shift folded from reference stats and weight/bias."""

    def __init__(self, num_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.scale: torch.Tensor | None = None  # folded, set by forward(update=True)
        self.shift: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, update: bool = False) -> torch.Tensor:
        dims = (0, 2, 3) if x.dim() == 4 else (0,)
        shape = (1, -1, 1, 1) if x.dim() == 4 else (1, -1)
        if update:  # x is the reference batch's activation: take its statistics
            mean = x.mean(dims)
            var = x.var(dims, unbiased=False)
            self.scale = self.weight * torch.rsqrt(var + EPS)
            self.shift = self.bias - mean * self.scale
        if self.scale is None:
            raise RuntimeError("VBN statistics missing: set a reference batch first "
                               "(policies.vbn.set_vbn_reference)")
        return x * self.scale.view(shape) + self.shift.view(shape)


class VBNSequential(nn.Sequential):
    """nn.Sequential that forwards `update` to its VirtualBatchNorm layers."""

    def forward(self, x: torch.Tensor, update: bool = False) -> torch.Tensor:
        for layer in self:
            x = layer(x, update) if isinstance(layer, VirtualBatchNorm) else layer(x)
        return x


class VBNModule(nn.Module):
    """Mixin state for a module that owns a reference batch and VBN layers.

    Subclasses implement `_forward(x, update)`. `forward` recomputes the statistics when
    stale; `mark_stale` is called by FlatPolicy whenever theta is written.
    """

    def init_vbn(self) -> None:
        self._reference: torch.Tensor | None = None
        self._stale = True

    def mark_stale(self) -> None:
        self._stale = True

    def set_reference(self, batch: np.ndarray) -> None:
        self._reference = torch.from_numpy(np.ascontiguousarray(batch))
        self._stale = True

    def refresh(self) -> None:
        if self._reference is None:
            raise RuntimeError("policy.vbn is on but no reference batch was set "
                               "(policies.vbn.set_vbn_reference)")
        with torch.no_grad():
            self._forward(self._reference, update=True)
        self._stale = False


def set_vbn_reference(policy: nn.Module, batch: np.ndarray) -> int:
    """Give every VBN-enabled module of `policy` the reference batch; returns how many."""
    found = [m for m in policy.modules() if isinstance(m, VBNModule) and getattr(m, "vbn", False)]
    for m in found:
        m.set_reference(batch)
    return len(found)


def uses_vbn(policy: nn.Module) -> bool:
    return any(isinstance(m, VBNModule) and getattr(m, "vbn", False) for m in policy.modules())


def restore_vbn_reference(policy: nn.Module, extras: dict) -> bool:
    """For tools that load a checkpoint (evaluate): set the saved reference batch, if any.

    Returns whether one was set; raises if the policy uses VBN and the checkpoint has none.
    """
    ref = extras.get(EXTRAS_KEY)
    if ref is None:
        if uses_vbn(policy):
            raise RuntimeError(f"the policy uses VBN but the checkpoint has no extras/{EXTRAS_KEY}")
        return False
    return set_vbn_reference(policy, ref) > 0
