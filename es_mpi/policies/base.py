"""What every policy shares: parameters that are views into ONE flat float32 vector.

ES never backpropagates, so a policy is a torch module whose parameters alias slices of a
single contiguous tensor. Setting theta + sigma*eps is then one numpy vector operation into
that memory, with no per-layer copies.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

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
        reset(target_return, seed)  at the start of an episode; `seed` (if given) reseeds
                              `self.generator`, the source of the policy's own randomness
                              (dropout masks, sampled actions)
        act(obs) -> action    one step; obs is the (already normalised) observation
        observe(reward)       the reward the last action earned (a DT lowers its return-to-go)
    """

    def finalize(self) -> None:
        self.requires_grad_(False)
        self.generator = torch.Generator()
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

    @contextmanager
    def trainable(self) -> Iterator["FlatPolicy"]:
        """Gradients on, for behaviour cloning (es_mpi.pretrain); ES never needs them.

        The parameters stay views of the flat vector: an optimiser's in-place steps write
        into it, so `get_theta()` is the trained theta. Caches built from theta (packed DT
        weights, VBN statistics) are dropped on exit.
        """
        self.requires_grad_(True)
        try:
            yield self
        finally:
            self.requires_grad_(False)
            for p in self.parameters():
                p.grad = None
            self._theta_changed()

    def reset(self, target_return: float | None = None, seed: int | None = None) -> None:
        if seed is not None:
            self.generator.manual_seed(int(seed))

    def observe(self, reward: float) -> None:
        pass

    def act(self, obs: np.ndarray):  # pragma: no cover - interface
        raise NotImplementedError


class ActionHead:
    """Turns raw network outputs into env actions.

    Box actions (`mapping`): "tanh" -> tanh(out) in [-1, 1], handed to the env as is (MuJoCo
    clamps to its ctrlrange; Lorenc & Neruda), "bounds" -> mid + half * tanh(out), inside the
    Box, "linear" -> out itself (OpenAI's MujocoPolicy). Discrete actions (`discrete`): "argmax"
    of the logits, or "sample" from their softmax with the policy's generator.
    """

    def __init__(self, action_space: gym.Space, mapping: str = "tanh",
                 discrete: str = "argmax"):
        self.discrete = isinstance(action_space, gym.spaces.Discrete)
        self.mapping, self.sample = mapping, discrete == "sample"
        if self.discrete:
            self.size = int(action_space.n)
        elif isinstance(action_space, gym.spaces.Box):
            self.size = int(np.prod(action_space.shape))
            low = np.asarray(action_space.low, dtype=np.float32)
            high = np.asarray(action_space.high, dtype=np.float32)
            if mapping == "bounds":
                if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
                    raise ValueError("policy.action_mapping 'bounds' needs finite action bounds")
                self.mid, self.half = (high + low) / 2, (high - low) / 2
        else:
            raise ValueError(f"unsupported action space {action_space}")
        if mapping not in ("tanh", "bounds", "linear") or discrete not in ("argmax", "sample"):
            raise ValueError(f"unknown action mapping {mapping!r} / {discrete!r}")

    def continuous(self, out: torch.Tensor) -> torch.Tensor:
        """Box actions: the mapping of `__call__` as a differentiable torch function of the
        raw outputs (..., act), for behaviour cloning."""
        if self.mapping == "linear":
            return out
        if self.mapping == "bounds":
            return torch.from_numpy(self.mid) + torch.from_numpy(self.half) * torch.tanh(out)
        return torch.tanh(out)

    def __call__(self, out: torch.Tensor, generator: torch.Generator | None = None):
        """out: (act,) raw outputs -> int (discrete) or float32 (act,) array."""
        if self.discrete:
            if self.sample:
                probs = torch.softmax(out.reshape(-1), dim=-1)
                return int(torch.multinomial(probs, 1, generator=generator))
            return int(torch.argmax(out))
        if self.mapping == "linear":
            return out.numpy().astype(np.float32, copy=True)
        squashed = torch.tanh(out).numpy()
        return self.mid + self.half * squashed if self.mapping == "bounds" else squashed.copy()
