"""What every policy shares: parameters that are views into ONE flat float32 vector.

ES never backpropagates, so a policy is a torch module whose parameters alias slices of a
single contiguous tensor. Setting theta + sigma*eps is then one numpy vector operation into
that memory, with no per-layer copies.
"""
from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from torch import nn


def flatten_parameters(module: nn.Module) -> torch.Tensor:
    """Re-point every parameter of `module` to a slice of one new flat float32 tensor."""
    params = list(module.parameters())
    flat = torch.empty(sum(p.numel() for p in params), dtype=torch.float32)
    offset = 0
    for p in params:
        n = p.numel()
        flat[offset: offset + n].copy_(p.detach().reshape(-1))
        p.data = flat[offset: offset + n].view_as(p)
        offset += n
    return flat


class FlatPolicy(nn.Module):
    """Base class. Subclasses build their layers, then call `self.finalize()`.

    Episode interface used by the rollout:
        reset(target_return)  at the start of an episode
        act(obs) -> action    one step; obs is the (already normalised) observation
        observe(reward)       the reward the last action earned (a DT lowers its return-to-go)
    """

    def finalize(self) -> None:
        self.requires_grad_(False)
        self._flat = flatten_parameters(self)
        self._flat_np = self._flat.numpy()  # shares memory with every parameter
        # modules caching something computed from theta (VBN statistics) are told of changes
        self._theta_watchers = [m for m in self.modules() if hasattr(m, "mark_stale")]

    def _theta_changed(self) -> None:
        for m in self._theta_watchers:
            m.mark_stale()

    @property
    def num_params(self) -> int:
        return self._flat.numel()

    def get_theta(self) -> np.ndarray:
        return self._flat_np.copy()

    def set_theta(self, theta: np.ndarray) -> None:
        self._flat_np[:] = theta
        self._theta_changed()

    def set_perturbed(self, theta: np.ndarray, eps: np.ndarray, scale: float) -> None:
        """Parameters <- theta + scale * eps, written straight into the flat vector."""
        np.multiply(eps, np.float32(scale), out=self._flat_np)
        self._flat_np += theta
        self._theta_changed()

    def reset(self, target_return: float | None = None) -> None:
        pass

    def observe(self, reward: float) -> None:
        pass

    def act(self, obs: np.ndarray):  # pragma: no cover - interface
        raise NotImplementedError


class ActionHead:
    """Turns raw network outputs into env actions: tanh-squash to Box bounds, or argmax."""

    def __init__(self, action_space: gym.Space):
        self.discrete = isinstance(action_space, gym.spaces.Discrete)
        if self.discrete:
            self.size = int(action_space.n)
        elif isinstance(action_space, gym.spaces.Box):
            self.size = int(np.prod(action_space.shape))
            low = np.asarray(action_space.low, dtype=np.float32)
            high = np.asarray(action_space.high, dtype=np.float32)
            if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
                raise ValueError("continuous policies need finite action bounds")
            self.mid, self.half = (high + low) / 2, (high - low) / 2
        else:
            raise ValueError(f"unsupported action space {action_space}")

    def __call__(self, out: torch.Tensor):
        """out: (act,) raw outputs -> int (discrete) or float32 (act,) array in the bounds."""
        if self.discrete:
            return int(torch.argmax(out))
        return self.mid + self.half * torch.tanh(out).numpy()
