"""Decision Transformer policy (Chen et al. 2021) for vector observations, trained by ES.

An episode is the token stream  R̂_0, s_0, a_0, R̂_1, s_1, a_1, ...  (return-to-go, state,
action). Each token is a linear embedding of its content plus a learned embedding of its
timestep, then LayerNorm; GPT-style causal blocks read the last K timesteps and the action of
step t is predicted from the hidden state of the token s_t and mapped by the ActionHead (tanh
in [-1, 1] as Chen et al. and Lorenc & Neruda, or into the Box's bounds; argmax or a softmax
sample for discrete actions); the token a_t holds that action. With `policy.dropout` the GPT
runs with dropout active, its masks drawn from the policy's per-episode generator.
R̂_0 = target_return * rtg_scale and every reward r lowers it by r * rtg_scale.

Per-step inference (`policy.inference`) never rebuilds the sequence: tokens are embedded once,
when they arrive, into preallocated rolling buffers (returns, states, actions, timesteps, and
the embedded tokens or the per-block queries/keys/values), and the window is a contiguous view
of them. Measured speeds: docs/performance.md.
  window    exact Chen et al. semantics: the action equals a full forward pass over the last
            K timesteps. Only what that pass needs is computed: layer-0 keys/queries/values are
            cached per token (a token's embedding does not depend on where the window starts,
            there are no positional embeddings), and the last block runs its query, attention
            and MLP for the s_t token alone. Blocks 1..L-2 must still run over the whole window,
            because when the window slides every token's attention context changes.
  kv_cache  streaming attention: every token attends to the tokens of its own and the K-1
            preceding timesteps, so its keys/values at every layer are computed once and cached
            (3 new tokens per step). Equal to a full forward pass with that banded mask
            (`DecisionTransformer.forward(..., band=K)`), and to the window semantics for the
            first K steps of an episode and at layer 0 always; after step K the deeper layers
            differ, so it is a (fast) model of its own, not an approximation of `window`.
  full      the naive reference: re-embed and re-run the whole window through the modules.

Parameter count (Humanoid-v4: 376-dim obs, 17-dim action; K=20, C=128, 3 layers, 1 head):
    embed_timestep 1000x128 = 128,000   embed_return 256     embed_state 48,256
    embed_action 2,304                  embed_ln 256         3 blocks x 198,272 = 594,816
    ln_f 256   predict_state 48,504   predict_action 2,193   predict_return 129
    total 824,970.
Lorenc & Neruda report ~825K for Chen's model: theirs (825,098) also holds GPT-2's unused
1-row token embedding (128); GPT-2's position table is removed in Chen's code and here.
predict_state / predict_return do not act; they are kept for the paper's parameter count and
for behaviour-cloning pretraining with auxiliary losses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import ActionHead, FlatPolicy


@dataclass
class GPTConfig:
    n_embd: int = 128  # C
    n_layer: int = 3
    n_head: int = 1
    inner_mult: int = 4  # MLP width = inner_mult * C
    activation: str = "relu"  # Chen et al. use relu for gym, GELU for Atari
    dropout: float = 0.0  # GPT input, attention weights, both residual branches (GPT-2/mingpt)
    scaled_residual_init: bool = False  # c_proj weights N(0, 0.02/sqrt(2 n_layer)) (GPT-2 paper)


# ----------------------------------------------------------------------------- GPT blocks

def dropout(x: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Inverted dropout whose mask comes from `generator` (no global RNG); identity if p = 0.

    The references never switch their DTs to eval mode on the ES path, so dropout is active
    in every rollout; here its masks are a function of the episode's seed.
    """
    if p == 0.0:
        return x
    keep = torch.rand(x.shape, generator=generator) >= p
    return x * keep / (1.0 - p)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.p = cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # q, k, v for all heads
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor, mask: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (z.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for z in (q, k, v))
        if self.p == 0.0:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, hd)
        else:  # dropout on the attention weights, as GPT-2 / mingpt
            att = (q @ k.transpose(-2, -1)) / math.sqrt(C // self.n_head)
            att = torch.softmax(att.masked_fill(~mask, float("-inf")), dim=-1)
            y = dropout(att, self.p, generator) @ v
        return dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)), self.p, generator)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.inner_mult * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.inner_mult * cfg.n_embd, cfg.n_embd)
        self.act = {"relu": F.relu, "gelu": F.gelu}[cfg.activation]
        self.p = cfg.dropout

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return dropout(self.c_proj(self.act(self.c_fc(x))), self.p, generator)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, generator)
        return x + self.mlp(self.ln_2(x), generator)


class GPT(nn.Module):
    """Token embeddings (B, T, C) -> hidden states (B, T, C); no token/position tables."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        # N(0, 0.02) weights, zero biases: Chen et al.'s GPT-2 copy and mingpt alike; the GPT-2
        # paper's 1/sqrt(2 n_layer) scaling of residual projections only on request
        residual_std = 0.02 / math.sqrt(2 * cfg.n_layer) if cfg.scaled_residual_init else 0.02
        for name, p in self.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                nn.init.normal_(p, 0.0, residual_std if name.endswith("c_proj.weight") else 0.02)
            elif name.endswith("bias") and "ln" not in name:
                nn.init.zeros_(p)

    def forward(self, x: torch.Tensor, mask: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
        x = dropout(x, self.cfg.dropout, generator)  # embedding dropout (embd_pdrop)
        for block in self.h:
            x = block(x, mask, generator)
        return self.ln_f(x)


def trajectory_mask(n_tokens: int, band: int | None = None) -> torch.Tensor:
    """(n, n) bool, True = may attend. Causal; with `band`, token i (timestep i//3) sees only
    tokens of timesteps > i//3 - band (its own and the band-1 before)."""
    i = torch.arange(n_tokens)
    mask = i[None, :] <= i[:, None]
    if band is not None:
        mask &= (i[:, None] // 3 - i[None, :] // 3) < band
    return mask


# ----------------------------------------------------------------------------- the model

class DecisionTransformer(nn.Module):
    """(returns (B,T), states (B,T,obs), actions (B,T,act) or (B,T) long, timesteps (B,T))
    -> raw action outputs (B,T,act) read at the state tokens."""

    position_free = True  # token embeddings do not depend on the window start

    def __init__(self, obs_dim: int, act_dim: int, discrete: bool, cfg: GPTConfig,
                 max_ep_len: int):
        super().__init__()
        C = cfg.n_embd
        self.max_ep_len = max_ep_len
        self.embed_timestep = nn.Embedding(max_ep_len, C)
        self.embed_return = nn.Linear(1, C)
        self.embed_state = nn.Linear(obs_dim, C)
        self.embed_action = nn.Embedding(act_dim, C) if discrete else nn.Linear(act_dim, C)
        self.embed_ln = nn.LayerNorm(C)
        self.transformer = GPT(cfg)
        self.predict_state = nn.Linear(C, obs_dim)  # not used to act (see module docstring)
        self.predict_action = nn.Linear(C, act_dim)
        self.predict_return = nn.Linear(C, 1)  # not used to act

    def embed(self, returns, states, actions, timesteps) -> torch.Tensor:
        """-> (B, 3T, C) tokens R̂_0, s_0, a_0, R̂_1, ..."""
        B, T = returns.shape
        time = self.embed_timestep(timesteps.clamp(max=self.max_ep_len - 1))
        r = self.embed_return(returns.unsqueeze(-1)) + time
        s = self.embed_state(states.reshape(B, T, -1)) + time
        a = self.embed_action(actions) + time
        return self.embed_ln(torch.stack((r, s, a), dim=2).reshape(B, 3 * T, -1))

    def forward(self, returns, states, actions, timesteps, band: int | None = None,
                generator: torch.Generator | None = None):
        x = self.embed(returns, states, actions, timesteps)
        h = self.transformer(x, trajectory_mask(x.shape[1], band), generator)
        return self.predict_action(h[:, 1::3])

    # --- one token at a time (the policy's rolling path); t is the episode timestep
    def _time(self, t: int) -> torch.Tensor:
        return self.embed_timestep.weight[min(t, self.max_ep_len - 1)]

    def return_token(self, rtg: float, t: int) -> torch.Tensor:
        w, b = self.embed_return.weight, self.embed_return.bias
        return _ln(w[:, 0] * rtg + b + self._time(t), self.embed_ln)

    def state_token(self, obs: torch.Tensor, t: int) -> torch.Tensor:
        return _ln(F.linear(obs.reshape(-1), self.embed_state.weight, self.embed_state.bias)
                   + self._time(t), self.embed_ln)

    def action_token(self, action: torch.Tensor, t: int) -> torch.Tensor:
        if isinstance(self.embed_action, nn.Embedding):
            e = self.embed_action.weight[int(action)]
        else:
            e = F.linear(action, self.embed_action.weight, self.embed_action.bias)
        return _ln(e + self._time(t), self.embed_ln)

    def window_input(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        return tokens  # position-free: the cached tokens are the transformer input

    def action_output(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.predict_action.weight, self.predict_action.bias)


def _ln(x: torch.Tensor, ln: nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def _attend(q, k, v, n_head: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """q (nq, C) already scaled by 1/sqrt(head dim), k/v (nk, C) -> (nq, C), heads split along
    C; `mask` (nq, nk) is additive (0 or -inf). Plain matmul/softmax: for a few tokens this
    beats F.scaled_dot_product_attention on CPU by several microseconds per call."""
    if n_head == 1:
        att = torch.mm(q, k.t()) if mask is None else torch.addmm(mask, q, k.t())
        return torch.mm(torch.softmax(att, dim=-1), v)
    nq, C = q.shape
    q, k, v = (z.view(z.shape[0], n_head, C // n_head).transpose(0, 1) for z in (q, k, v))
    att = torch.bmm(q, k.transpose(1, 2))  # (H, nq, nk)
    if mask is not None:
        att += mask
    return torch.bmm(torch.softmax(att, dim=-1), v).transpose(0, 1).reshape(nq, C)


def _additive(mask: torch.Tensor) -> torch.Tensor:
    return torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))


def _ln_args(m: nn.LayerNorm) -> tuple:
    """Arguments of torch.layer_norm (the builtin: skips F.layer_norm's Python checks)."""
    return (m.normalized_shape, m.weight, m.bias, m.eps)


def _in_out(lin: nn.Linear) -> torch.Tensor:
    return lin.weight.t().contiguous()


class LayerWeights(NamedTuple):
    """One Block's weights as plain tensors for the per-step paths: matrices stored (in, out)
    for x @ W, the query part of c_attn pre-multiplied by 1/sqrt(head dim). With one head the
    output projection is folded into the values: v' = ln(x) (W_v W_proj) + (b_v W_proj + b_proj),
    so softmax(q k^T) v' is the projected attention output (softmax rows sum to 1) and one
    matrix product a step is saved per block."""

    ln_1: tuple
    w_attn: torch.Tensor
    b_attn: torch.Tensor
    w_proj: torch.Tensor
    b_proj: torch.Tensor
    ln_2: tuple
    w_fc: torch.Tensor
    b_fc: torch.Tensor
    w_fc2: torch.Tensor
    b_fc2: torch.Tensor
    act: object
    n_head: int
    folded: bool  # W_proj folded into the values (n_head == 1)

    @classmethod
    def of(cls, blk: Block) -> "LayerWeights":
        C = blk.attn.c_attn.in_features
        scale = 1.0 / math.sqrt(C // blk.attn.n_head)
        w_attn, b_attn = _in_out(blk.attn.c_attn), blk.attn.c_attn.bias.clone()
        w_attn[:, :C] *= scale
        b_attn[:C] *= scale
        w_proj, b_proj = _in_out(blk.attn.c_proj), blk.attn.c_proj.bias
        folded = blk.attn.n_head == 1
        if folded:
            b_attn[2 * C:] = b_attn[2 * C:] @ w_proj + b_proj
            w_attn[:, 2 * C:] = w_attn[:, 2 * C:] @ w_proj
        return cls(_ln_args(blk.ln_1), w_attn, b_attn, w_proj, b_proj, _ln_args(blk.ln_2),
                   _in_out(blk.mlp.c_fc), blk.mlp.c_fc.bias, _in_out(blk.mlp.c_proj),
                   blk.mlp.c_proj.bias,
                   torch.relu_ if blk.mlp.act is F.relu else blk.mlp.act,  # in place: no copy
                   blk.attn.n_head, folded)

    def qkv(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(n, C) block input -> (n, 3C) scaled queries, keys, values (written to `out`)."""
        return torch.addmm(self.b_attn, torch.layer_norm(x, *self.ln_1), self.w_attn, out=out)

    def attn(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (nq, C) + projected attention of queries q (nq, C) over keys/values (nk, C)."""
        if self.folded:
            att = torch.mm(q, k.t()) if mask is None else torch.addmm(mask, q, k.t())
            return torch.addmm(x, torch.softmax(att, dim=-1), v)
        y = _attend(q, k, v, self.n_head, mask)
        return torch.addmm(self.b_proj, y, self.w_proj).add_(x)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """x + MLP(ln_2(x))."""
        h = self.act(torch.addmm(self.b_fc, torch.layer_norm(x, *self.ln_2), self.w_fc))
        return torch.addmm(self.b_fc2, h, self.w_fc2).add_(x)


class EmbedWeights(NamedTuple):
    """The gym DT's embedding and output weights as plain tensors (kv_cache path)."""

    time: torch.Tensor  # (max_ep_len, C)
    w_return: torch.Tensor  # (C,)
    b_return: torch.Tensor
    w_state: torch.Tensor  # (C, obs) for addmv
    b_state: torch.Tensor
    w_action: torch.Tensor  # (C, act) for addmv, or the (n, C) embedding table
    b_action: torch.Tensor | None
    ln: tuple  # embed_ln
    ln_f: tuple
    w_out: torch.Tensor  # (act, C) for addmv
    b_out: torch.Tensor

    @classmethod
    def of(cls, m: "DecisionTransformer") -> "EmbedWeights":
        table = isinstance(m.embed_action, nn.Embedding)
        return cls(m.embed_timestep.weight, m.embed_return.weight[:, 0].contiguous(),
                   m.embed_return.bias, m.embed_state.weight, m.embed_state.bias,
                   m.embed_action.weight, None if table else m.embed_action.bias,
                   _ln_args(m.embed_ln), _ln_args(m.transformer.ln_f),
                   m.predict_action.weight, m.predict_action.bias)


class DropoutWindow:
    """The window through the GPT blocks with dropout active (`policy.dropout` > 0, inference
    `window`) without the module machinery: the same ATen ops on the same shapes and strides in
    the same order as `GPT.forward` on the window, and the generator draws the same masks
    (tests/test_step_path.py). What it saves:
      - the modules' per-call Python (module calls, the dropout function, the causal mask
        rebuilt every step and negated in every block);
      - the step's masks drawn by one torch.rand call and compared once (the CPU generator
        hands out one 32-bit draw per value in order, so one draw of the concatenated sizes
        is the sequence of per-site draws);
      - in the last block, everything after the keys and values runs on the newest LAST_ROWS
        tokens alone: only the newest state token's output is read and its masks are the same
        rows of the full draws. Whether a GEMM kernel computes a row the same way whatever
        the row count depends on the CPU and MKL's mode: with AVX2 kernels unpinned it does
        for >= 4 rows, on AVX-512 for >= 16, and under MKL_CBWR=AVX2 (es_mpi's pinning) on an
        AVX-512 CPU for no count. So this path equals the modules bitwise only without the
        row cut (LAST_ROWS >= the window); with it, to float32 rounding (~1e-7). Every rank
        runs this same path, so theta stays bitwise rank-count invariant either way;
      - the final LayerNorm on the newest token alone (a row-wise op).
    Masks are rand >= p applied as x * keep / (1 - p), as in `dropout`."""

    LAST_ROWS = 8

    def __init__(self, gpt: GPT):
        self.p, self.keep_div = gpt.cfg.dropout, 1.0 - gpt.cfg.dropout
        self.blocks = [_BlockArgs.of(blk) for blk in gpt.h]
        self.ln_f = _ln_args(gpt.ln_f)
        self._masked: dict[int, torch.Tensor] = {}  # n -> positions a token may NOT attend

    def _keep(self, n: int, C: int, generator: torch.Generator) -> list[torch.Tensor]:
        """The step's dropout masks in the modules' order of draws: input (n, C), then per
        block attention weights (1, H, n, n) and the two residual branches (n, C)."""
        shapes = [(n, C)]
        for b in self.blocks:
            shapes += [(1, b.n_head, n, n), (n, C), (n, C)]
        sizes = [math.prod(shape) for shape in shapes]
        keep = torch.rand(sum(sizes), generator=generator) >= self.p
        return [k.view(shape) for k, shape in zip(keep.split(sizes), shapes)]

    def __call__(self, tokens: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """tokens (n, C), the window's transformer input -> ln_f of the newest token (C,)."""
        n, C = tokens.shape
        if n not in self._masked:
            self._masked[n] = ~trajectory_mask(n)
        keep = iter(self._keep(n, C, generator))
        x = tokens.mul(next(keep)).div_(self.keep_div)
        for i, b in enumerate(self.blocks):
            r = max(n - self.LAST_ROWS, 0) if i == len(self.blocks) - 1 else 0  # first row out
            att_keep, keep_1, keep_2 = next(keep), next(keep)[r:], next(keep)[r:]
            a = self._attention(b, x, self._masked[n][r:], att_keep[:, :, r:], r)
            x = a.mul_(keep_1).div_(self.keep_div).add_(x[r:])  # a + x == x + a, bitwise
            h = b.act(torch.addmm(b.b_fc, torch.layer_norm(x, *b.ln_2), b.w_fc))
            x = torch.addmm(b.b_fc2, h, b.w_fc2).mul_(keep_2).div_(self.keep_div).add_(x)
        return torch.layer_norm(x[-1:], *self.ln_f)[0]

    def _attention(self, b: "_BlockArgs", x: torch.Tensor, masked: torch.Tensor,
                   att_keep: torch.Tensor, r: int) -> torch.Tensor:
        """c_proj(attention) of the queries of rows r.. over all keys/values, before its
        residual dropout; the views have the modules' shapes and strides."""
        n, C = x.shape
        qkv = torch.addmm(b.b_attn, torch.layer_norm(x, *b.ln_1), b.w_attn)  # (n, 3C)
        q, k, v = (z.view(1, n, b.n_head, C // b.n_head).transpose(1, 2)
                   for z in qkv.view(1, n, 3 * C).split(C, dim=2))
        att = torch.matmul(q[:, :, r:], k.transpose(-2, -1)).div_(b.sqrt_hd)
        att = torch.softmax(att.masked_fill_(masked, float("-inf")), dim=-1)
        y = torch.matmul(att.mul_(att_keep).div_(self.keep_div), v)
        y = y.transpose(1, 2).reshape(n - r, C)  # a view for one head, a copy for several
        return torch.addmm(b.b_proj, y, b.w_proj)


class _BlockArgs(NamedTuple):
    """One Block's parameters as plain tensors (views, (in, out) transposes as nn.Linear
    passes them to addmm), for DropoutWindow."""

    ln_1: tuple
    w_attn: torch.Tensor
    b_attn: torch.Tensor
    w_proj: torch.Tensor
    b_proj: torch.Tensor
    ln_2: tuple
    w_fc: torch.Tensor
    b_fc: torch.Tensor
    w_fc2: torch.Tensor
    b_fc2: torch.Tensor
    act: object
    n_head: int
    sqrt_hd: float

    @classmethod
    def of(cls, blk: Block) -> "_BlockArgs":
        a, m = blk.attn, blk.mlp
        act = torch.relu_ if m.act is F.relu else m.act  # in place: the same values
        return cls(_ln_args(blk.ln_1), a.c_attn.weight.t(), a.c_attn.bias, a.c_proj.weight.t(),
                   a.c_proj.bias, _ln_args(blk.ln_2), m.c_fc.weight.t(), m.c_fc.bias,
                   m.c_proj.weight.t(), m.c_proj.bias, act, a.n_head,
                   math.sqrt(a.c_attn.in_features // a.n_head))


class Ring:
    """Timesteps [start, start+len) of an episode in arrays of 2*keep rows, so the live window
    is always a contiguous view; when the end is reached the live rows move to the front
    (once every `keep` steps: amortised O(1) per step)."""

    def __init__(self, keep: int):
        self.keep, self.cap = keep, 2 * keep
        self.arrays: list[tuple[torch.Tensor, int]] = []
        self.start = self.len = 0

    def add(self, arr: torch.Tensor, rows_per_step: int) -> torch.Tensor:
        self.arrays.append((arr, rows_per_step))
        return arr

    def reset(self) -> None:
        self.start = self.len = 0

    def push(self) -> int:
        """Append a timestep; returns its row."""
        if self.start + self.len == self.cap:  # start >= keep >= len: source and target disjoint
            for arr, m in self.arrays:
                arr[: self.len * m].copy_(arr[self.start * m: (self.start + self.len) * m])
            self.start = 0
        self.len += 1
        return self.start + self.len - 1

    def drop(self) -> None:
        self.start += 1
        self.len -= 1


class ModuleTokens:
    """Embeds a timestep's tokens into the policy's token buffer through the model's own
    per-token functions (return_token, state_token, action_token): any DT model."""

    def __init__(self, model: nn.Module, tok: torch.Tensor, states: torch.Tensor,
                 actions: torch.Tensor):
        self.model, self.tok, self.states, self.actions = model, tok, states, actions

    def state(self, slot: int, rtg: float, t: int) -> None:
        """Tokens R̂_t, s_t (rows 3 slot, 3 slot + 1) from the recorded return and state."""
        self.tok[3 * slot] = self.model.return_token(rtg, t)
        self.tok[3 * slot + 1] = self.model.state_token(self.states[slot], t)

    def action(self, slot: int, t: int) -> None:
        """Token a_t (row 3 slot + 2) from the recorded action."""
        self.tok[3 * slot + 2] = self.model.action_token(self.actions[slot], t)


class LeanTokens(ModuleTokens):
    """The vector DT's tokens by the same ops as DecisionTransformer.return_token /
    state_token / action_token (the same bits), written into preallocated rows, R̂_t and s_t
    through one LayerNorm, with the weights and the buffers' row views looked up once: a
    step's embedding costs a dozen torch calls instead of ~30 calls and module lookups."""

    def __init__(self, model: "DecisionTransformer", tok: torch.Tensor, states: torch.Tensor,
                 actions: torch.Tensor):
        super().__init__(model, tok, states, actions)
        m, C = model, tok.shape[1]
        self.time, self.last = m.embed_timestep.weight, m.max_ep_len - 1
        self.w_return, self.b_return = m.embed_return.weight[:, 0], m.embed_return.bias
        self.w_state, self.b_state = m.embed_state.weight.t(), m.embed_state.bias  # F.linear's
        self.table = isinstance(m.embed_action, nn.Embedding)
        self.w_action = m.embed_action.weight if self.table else m.embed_action.weight.t()
        self.b_action = None if self.table else m.embed_action.bias
        self.ln = _ln_args(m.embed_ln)
        self.pre = torch.zeros(2, C)  # R̂_t, s_t before LayerNorm
        self.pre_r, self.pre_s, self.pre_a = self.pre[0], self.pre[1:], torch.zeros(1, C)
        rows = range(states.shape[0])
        self.state_rows = [states[i: i + 1] for i in rows]  # views, made once
        self.action_rows = [actions[i: i + 1] for i in rows]
        self.rs_rows = [tok[3 * i: 3 * i + 2] for i in rows]
        self.a_rows = [tok[3 * i + 2: 3 * i + 3] for i in rows]

    def state(self, slot: int, rtg: float, t: int) -> None:
        torch.mul(self.w_return, rtg, out=self.pre_r).add_(self.b_return)
        torch.addmm(self.b_state, self.state_rows[slot], self.w_state, out=self.pre_s)
        self.pre.add_(self.time[min(t, self.last)])
        self.rs_rows[slot].copy_(torch.layer_norm(self.pre, *self.ln))

    def action(self, slot: int, t: int) -> None:
        a, time = self.action_rows[slot], self.time[min(t, self.last)]
        if self.table:
            torch.add(self.w_action[int(a)], time, out=self.pre_a[0])
        else:
            torch.addmm(self.b_action, a, self.w_action, out=self.pre_a).add_(time)
        self.a_rows[slot].copy_(torch.layer_norm(self.pre_a, *self.ln))


class _Episode:
    """The per-episode scalars of a DTPolicy, in a plain object: nn.Module's __setattr__
    costs ~2 us a write, several times a step."""

    def __init__(self, rtg: float):
        self.rtg = rtg  # current return-to-go, scaled
        self.t = 0  # episode timestep
        self.pending_action = False  # kv_cache: a_{t-1} still to run through the blocks
        self.last_output: torch.Tensor | None = None  # raw action output of the last act()


# ----------------------------------------------------------------------------- the policy

class DTPolicy(FlatPolicy):
    """FlatPolicy around a Decision Transformer; see the module docstring for inference modes."""

    def __init__(self, model: nn.Module, action_space: gym.Space, obs_shape: tuple,
                 context: int, rtg_scale: float, target_return: float, inference: str,
                 obs_uint8: bool = False, action_mapping: str = "tanh",
                 discrete_action: str = "argmax"):
        super().__init__()
        if inference == "kv_cache" and not model.position_free:
            raise ValueError("policy.inference: kv_cache needs a model without positional "
                             "embeddings; use 'window'")
        self.dropout = model.transformer.cfg.dropout
        if inference == "kv_cache" and self.dropout:
            raise ValueError("policy.dropout needs policy.inference 'window' or 'full'")
        self.model = model
        self.head = ActionHead(action_space, action_mapping, discrete_action)
        self.context, self.rtg_scale, self.target_return = context, rtg_scale, target_return
        self.inference = inference
        self.finalize()
        self._dropout_window = DropoutWindow(model.transformer) if self.dropout else None
        self._frames = obs_uint8
        self._build_buffers(obs_shape, torch.uint8 if obs_uint8 else torch.float32)
        self.reset()

    def _build_buffers(self, obs_shape: tuple, obs_dtype: torch.dtype) -> None:
        gpt = self.model.transformer.cfg
        C, K = gpt.n_embd, self.context
        kv = self.inference == "kv_cache"
        ring = self.ring = Ring(K + 1 if kv else K)  # kv: a_{t-1} may still see step t-K
        cap = ring.cap
        act_shape = () if self.head.discrete else (self.head.size,)
        act_dtype = torch.long if self.head.discrete else torch.float32
        self._rtg = ring.add(torch.zeros(cap), 1)
        self._states = ring.add(torch.zeros((cap, *obs_shape), dtype=obs_dtype), 1)
        self._actions = ring.add(torch.zeros((cap, *act_shape), dtype=act_dtype), 1)
        self._timesteps = ring.add(torch.zeros(cap, dtype=torch.long), 1)
        # numpy views of the same memory: element writes from numpy are ~3x cheaper
        self._np = {name: getattr(self, name).numpy()
                    for name in ("_rtg", "_states", "_actions", "_timesteps")}
        if kv:  # no token embeddings kept: every block's q, k, v per token (q too, since the
            # product is written straight into this buffer)
            self._qkv = [ring.add(torch.zeros(3 * cap, 3 * C), 3) for _ in range(gpt.n_layer)]
            self._pre = torch.zeros(3, C)  # a_{t-1}, R̂_t, s_t before LayerNorm
        else:
            self._tok = ring.add(torch.zeros(3 * cap, C), 3)  # embedded tokens
            if self.model.position_free:
                self._qkv0 = ring.add(torch.zeros(3 * cap, 3 * C), 3)  # block 0's q, k, v
            lean = isinstance(self.model, DecisionTransformer)
            self._tokens = (LeanTokens if lean else ModuleTokens)(
                self.model, self._tok, self._states, self._actions)
        self._masks: dict = {}
        self._packed: tuple | None = None

    # --- episode interface
    def reset(self, target_return: float | None = None, seed: int | None = None) -> None:
        super().reset(target_return, seed)
        target = self.target_return if target_return is None else target_return
        self._ep = _Episode(float(target) * self.rtg_scale)
        self.ring.reset()

    def observe(self, reward: float) -> None:
        ep = self._ep
        ep.rtg -= float(reward) * self.rtg_scale
        ep.t += 1

    @property
    def _rtg_now(self) -> float:
        return self._ep.rtg

    @property
    def _t(self) -> int:
        return self._ep.t

    @property
    def last_output(self) -> torch.Tensor:
        """The last act()'s raw action output (pre-squash / logits), for tests and tools."""
        return self._ep.last_output

    @torch.inference_mode()
    def act(self, obs: np.ndarray):
        ring, ep = self.ring, self._ep
        if self.inference != "kv_cache" and ring.len == self.context:
            ring.drop()
        slot = ring.push()
        self._record(slot, obs)
        if self.inference == "kv_cache":
            out = self._kv_step(slot)
        else:
            self._tokens.state(slot, ep.rtg, ep.t)
            if self.inference == "full":
                out = self.full_forward()
            elif self.dropout:
                out = self._window_step_dropout(slot)
            else:
                out = self._window_step(slot)
        ep.last_output = out
        action = self.head(out, self.generator)
        self._np["_actions"][slot] = action
        self._embed_action(slot)
        ep.pending_action = True
        return action

    def _record(self, slot: int, obs: np.ndarray) -> None:
        """Raw history in the rolling buffers (the action is filled in after it is chosen)."""
        if self._frames and np.asarray(obs).dtype != np.uint8:
            raise ValueError("the image DT takes raw uint8 frames (it scales them itself); "
                             "set env.normalize_obs: false")
        raw, ep = self._np, self._ep
        raw["_rtg"][slot] = ep.rtg
        raw["_states"][slot] = np.reshape(obs, raw["_states"].shape[1:])
        raw["_actions"][slot] = 0
        raw["_timesteps"][slot] = ep.t

    def _embed_action(self, slot: int) -> None:
        t = self._ep.t
        if self.inference == "kv_cache":  # pre-LayerNorm; a_t runs through the blocks next step
            a, e = self._actions[slot], self._packed[1]
            row = self._pre[0]
            if e.b_action is None:
                torch.add(e.w_action[int(a)], e.time[min(t, len(e.time) - 1)], out=row)
            else:
                torch.addmv(e.b_action, e.w_action, a, out=row)
                row += e.time[min(t, len(e.time) - 1)]
            return
        self._tokens.action(slot, t)
        if self.inference == "window" and self.model.position_free and not self.dropout:
            rows = slice(3 * slot, 3 * slot + 3)
            self._qkv0[rows] = self._block0_qkv(self._tok[rows])

    # --- reference: the whole window through the modules (what Chen et al. run every step)
    def full_forward(self, band: int | None = None) -> torch.Tensor:
        """Raw action output for the newest state token, from the buffers' live window."""
        lo, hi = self.ring.start, self.ring.start + self.ring.len
        out = self.model(self._rtg[None, lo:hi], self._states[None, lo:hi],
                         self._actions[None, lo:hi], self._timesteps[None, lo:hi], band=band,
                         generator=self.generator)
        return out[0, -1]

    def _window_step_modules(self, slot: int) -> torch.Tensor:
        """The window through the GPT modules (dropout active: every token's mask is new at
        every step, as when the references re-run the whole window), from the cached tokens."""
        lo, hi = 3 * self.ring.start, 3 * slot + 2
        x = self.model.window_input(self._tok[lo:hi], self._t)[None]
        h = self.model.transformer(x, trajectory_mask(hi - lo), self.generator)
        return self.model.action_output(h[0, -1])

    def _window_step_dropout(self, slot: int) -> torch.Tensor:
        """`_window_step_modules` without the modules (DropoutWindow)."""
        lo, hi = 3 * self.ring.start, 3 * slot + 2
        x = self.model.window_input(self._tok[lo:hi], self._t)
        return self.model.action_output(self._dropout_window(x, self.generator))

    # --- packed weights for the per-step paths
    def _theta_changed(self) -> None:
        """Every write of theta goes through FlatPolicy's hook: drop the packed copies."""
        super()._theta_changed()
        self._packed = None

    def _pack(self) -> tuple[list[LayerWeights], EmbedWeights | None]:
        """Plain-tensor copies/views of the weights (see LayerWeights): a cache of the flat
        vector, rebuilt after set_theta / set_perturbed (once per episode, ~1 ms)."""
        if self._packed is None:
            layers = [LayerWeights.of(blk) for blk in self.model.transformer.h]
            embed = EmbedWeights.of(self.model) if self.inference == "kv_cache" else None
            self._packed = (layers, embed)
        return self._packed

    def _block0_qkv(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._pack()[0][0].qkv(tokens)

    # --- exact window path
    def _window_step(self, slot: int) -> torch.Tensor:
        gpt = self.model.transformer
        C = gpt.cfg.n_embd
        lo, hi = 3 * self.ring.start, 3 * slot + 2  # R̂, s, a, ..., R̂_t, s_t (no a_t yet)
        x = self.model.window_input(self._tok[lo:hi], self._t)
        cached = self.model.position_free
        if cached:
            self._qkv0[3 * slot: hi] = self._block0_qkv(self._tok[3 * slot: hi])
        layers = self._pack()[0]
        last = len(layers) - 1
        for i, w in enumerate(layers):
            qkv = self._qkv0[lo:hi] if (i == 0 and cached) else w.qkv(x)
            k, v = qkv[:, C:2 * C], qkv[:, 2 * C:]
            if i == last:  # only s_t's output is needed: one query against all keys
                x = w.attn(x[-1:], qkv[-1:, :C], k, v)
            else:
                x = w.attn(x, qkv[:, :C], k, v, self._causal(hi - lo))
            x = w.mlp(x)
        return self.model.action_output(_ln(x[-1], gpt.ln_f))

    def _causal(self, n: int) -> torch.Tensor:
        if n not in self._masks:
            self._masks[n] = _additive(trajectory_mask(n))
        return self._masks[n]

    # --- streaming K/V cache path
    def _kv_step(self, slot: int) -> torch.Tensor:
        ring, ep = self.ring, self._ep
        t = ep.t
        layers, e = self._pack()
        C = e.time.shape[1]
        # tokens R̂_t, s_t (and a_{t-1}, embedded at the end of the last step) before LayerNorm
        pre = self._pre if ep.pending_action else self._pre[1:]
        torch.add(e.b_return, e.w_return, alpha=ep.rtg, out=self._pre[1])
        torch.addmv(e.b_state, e.w_state, self._states[slot], out=self._pre[2])
        self._pre[1:] += e.time[min(t, len(e.time) - 1)]
        x = torch.layer_norm(pre, *e.ln)
        first, lo, hi = 3 * slot + 2 - len(pre), 3 * ring.start, 3 * slot + 2
        # R̂_t and s_t must not see timestep t-K (still held for a_{t-1}, which may)
        off = 3 if ring.len == self.context + 1 else 0
        mask = self._kv_mask(len(pre), hi - lo, off)
        last = len(layers) - 1
        for i, w in enumerate(layers):
            qkv = w.qkv(x, out=self._qkv[i][first:hi])  # (nq, 3C), cached in place
            if i == last:  # only s_t's output is needed
                kv = self._qkv[i][lo + off:hi]
                x = w.attn(x[-1:], qkv[-1:, :C], kv[:, C:2 * C], kv[:, 2 * C:])
            else:
                kv = self._qkv[i][lo:hi]
                x = w.attn(x, qkv[:, :C], kv[:, C:2 * C], kv[:, 2 * C:], mask)
            x = w.mlp(x)
        ep.pending_action = False
        if ring.len == self.context + 1:
            ring.drop()
        return torch.addmv(e.b_out, e.w_out, torch.layer_norm(x[0], *e.ln_f))

    def _kv_mask(self, nq: int, nk: int, off: int) -> torch.Tensor:
        """(nq, nk) additive: query i is key nk-nq+i; it sees keys up to itself, and R̂_t, s_t
        (the last two queries) none of the first `off` keys."""
        key = (nq, nk, off)
        if key not in self._masks:
            qpos = torch.arange(nk - nq, nk)[:, None]
            kpos = torch.arange(nk)[None, :]
            mask = kpos <= qpos
            mask[max(nq - 2, 0):, :off] = False
            self._masks[key] = _additive(mask)
        return self._masks[key]


def make_dt(cfg, observation_space: gym.Space, action_space: gym.Space) -> DTPolicy:
    """Vector observations, Box or Discrete actions (the continuous-control DT)."""
    discrete = isinstance(action_space, gym.spaces.Discrete)
    act_dim = int(action_space.n) if discrete else int(np.prod(action_space.shape))
    obs_dim = int(np.prod(observation_space.shape))
    gpt = GPTConfig(cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.inner_mult, "relu", cfg.dropout,
                    cfg.scaled_residual_init)
    model = DecisionTransformer(obs_dim, act_dim, discrete, gpt, cfg.max_ep_len)
    return DTPolicy(model, action_space, (obs_dim,), cfg.context, cfg.rtg_scale,
                    cfg.target_return, cfg.inference, action_mapping=cfg.action_mapping,
                    discrete_action=cfg.discrete_action)
