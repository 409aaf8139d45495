"""MLP policy: obs -> hidden... -> act (Salimans et al. 2017; Lorenc & Neruda 2025)."""
from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from ..config import parse_action_bins
from .base import ActionHead, FlatPolicy


def normc_(weight: torch.Tensor, std: float) -> None:
    """OpenAI's normc initialiser: N(0, 1) rows scaled to norm `std` (one row per output unit,
    the columns of their TF (in, out) matrices)."""
    with torch.no_grad():
        w = torch.randn(weight.shape)
        weight.copy_(w * (std / w.square().sum(dim=1, keepdim=True).sqrt()))


def bin_values(mode: str, bins: int, values: tuple[float, ...], low: np.ndarray,
               high: np.ndarray) -> np.ndarray:
    """(act_dim, bins) float32: the action of bin i of each dimension, computed in float32 in
    OpenAI's order. uniform: 1/(bins-1) * i * (high - low) + low; custom: (high - low) /
    (v_k - v_1) * (v_i - v_1) + low."""
    span = high - low
    if mode == "uniform":
        steps = np.float32(1.0 / (bins - 1.0)) * np.arange(bins, dtype=np.float32)
        return steps[None, :] * span[:, None] + low[:, None]
    v = np.asarray(values, dtype=np.float32)
    return span[:, None] / (v[-1] - v[0]) * (v - v[0])[None, :] + low[:, None]


class BinnedActionHead:
    """OpenAI's binned Box actions (policy.action_bins uniform:N / custom:...): the network's
    act_dim * k outputs are k scores per action dimension, dimension-major (their reshape to
    (act_dim, k)); each dimension takes the value of its highest-scoring bin, the first on ties
    (torch.argmax). Deterministic: no generator is used."""

    discrete = False

    def __init__(self, action_space: gym.Space, spec: str):
        mode, bins, values = parse_action_bins(spec)
        if not isinstance(action_space, gym.spaces.Box):
            raise ValueError(f"policy.action_bins={spec}: binned actions need a Box action "
                             f"space, got {action_space}")
        low = np.asarray(action_space.low, dtype=np.float32).reshape(-1)
        high = np.asarray(action_space.high, dtype=np.float32).reshape(-1)
        if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
            raise ValueError(f"policy.action_bins={spec}: needs finite action bounds")
        self.table = bin_values(mode, bins, values, low, high)
        self.act_dim, self.bins = self.table.shape
        self.size = self.act_dim * self.bins
        self._dims = np.arange(self.act_dim)

    def indices(self, out: torch.Tensor) -> np.ndarray:
        """(act_dim * k,) scores -> (act_dim,) int64 bin of each dimension."""
        return torch.argmax(out.reshape(self.act_dim, self.bins), dim=1).numpy()

    def __call__(self, out: torch.Tensor, generator: torch.Generator | None = None) -> np.ndarray:
        return self.table[self._dims, self.indices(out)]  # a new float32 (act_dim,) array

    def continuous(self, out: torch.Tensor) -> torch.Tensor:
        raise ValueError("policy.action_bins: an argmax over bins has no gradient; behaviour "
                         "cloning needs policy.action_bins continuous")


class MLPPolicy(FlatPolicy):
    """obs (obs_dim,) -> [Linear, act] x len(hidden) -> Linear (head.size,) -> head.

    The head: ActionHead (act_dim or n outputs), or BinnedActionHead (act_dim * k scores) when
    `action_bins` is not "continuous". init "torch": PyTorch's default Linear init (Lorenc &
    Neruda); "normc": OpenAI's, normc(1) hidden layers, normc(0.01) output layer (the scores
    layer too), zero biases. The count is `num_params`.
    """

    def __init__(self, obs_dim: int, action_space: gym.Space, hidden=(256, 256),
                 activation: str = "tanh", action_mapping: str = "tanh",
                 discrete_action: str = "argmax", init: str = "torch",
                 action_bins: str = "continuous"):
        super().__init__()
        if parse_action_bins(action_bins)[0] == "continuous":
            self.head = ActionHead(action_space, action_mapping, discrete_action)
        else:
            self.head = BinnedActionHead(action_space, action_bins)
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
        self._lean = LeanMLP(self.net)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)  # (..., obs_dim) -> (..., head.size)

    def act(self, obs: np.ndarray):
        return self.head(self._lean(obs), self.generator)


class LeanMLP:
    """The forward of one observation without the module machinery, bitwise equal to
    `net(x)`: the same ATen kernels on the same shapes (nn.Linear on a 1-D input runs
    addmm(bias, x.view(1, -1), W.t())), written into preallocated (1, width) buffers, the
    activation applied in place. The weights are views of the flat parameter vector, so
    set_theta / set_perturbed need no refresh. Costs a few microseconds a layer against
    tens for the module (measured: docs/performance.md)."""

    _INPLACE = {nn.Tanh: torch.tanh_, nn.ReLU: torch.relu_}

    def __init__(self, net: nn.Sequential):
        layers = list(net)
        first = layers[0]
        self.x = torch.zeros(1, first.in_features)
        self.x_np = self.x.numpy()  # numpy view: element writes from numpy are cheapest
        self.layers = []
        for i, lin in enumerate(layers):
            if not isinstance(lin, nn.Linear):
                continue
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            act = self._INPLACE[type(nxt)] if nxt is not None else None
            self.layers.append((lin.weight.t(), lin.bias, torch.zeros(1, lin.out_features), act))
        self.out = self.layers[-1][2][0]  # (act_dim,) view, made once: indexing costs ~1 us

    def __call__(self, obs: np.ndarray) -> torch.Tensor:
        """obs (obs_dim,) -> raw outputs (act_dim,), a view of a buffer the next call reuses."""
        self.x_np[0] = np.reshape(obs, -1)  # float64 obs cast like np.asarray(obs, float32)
        h = self.x
        for w_t, bias, out, act in self.layers:
            torch.addmm(bias, h, w_t, out=out)
            if act is not None:
                act(out)
            h = out
        return self.out
