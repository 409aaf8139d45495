"""Decision Transformer for image observations and discrete actions (Chen et al. 2021, Atari).

Tokens per timestep: R̂_t, s_t, a_t with
    R̂ -> tanh(Linear(1, C))     s -> tanh(ConvEncoder(frames))     a -> tanh(Embedding(n, C))
The transformer input is  token + global_pos_emb[t] + pos_emb[position in the window]  where t
is the current episode timestep (what Chen et al. and Lorenc & Neruda feed when acting), then
GPT blocks with GELU, ln_f and a bias-free head; the action is the argmax of the logits at
the s_t token, or a sample from their softmax (`policy.discrete_action: sample`, Lorenc's).

Because the position embedding depends on where a token sits in the window, only the token
contents are cached (each frame is encoded once, when it arrives: the costly part); the blocks
run over the window every step (`policy.inference: window`, or `full` for the reference).

Parameter count with C=128, 6 layers, 8 heads, K=30, 4 input frames and 18 actions (Hero):
    state encoder 479,520 (convs 77,984 + Linear(3136, 128) 401,536)
    embed_return 256   embed_action 2,304   pos_emb 90x128 = 11,520
    6 blocks x 198,272 = 1,189,632   ln_f 256   head 2,304
    = 1,685,792  +  global_pos_emb: 128 per row (max_ep_len rows)
e.g. the authors' max_timestep 10,000 -> 2,965,792 (jobs/atari_hero.yaml), +576 with
`policy.vbn` (scale and shift of 32+64+64+128 VBN features). The paper's "≈2.49M" is mingpt's
log line, printed before the encoder and the return/action embeddings exist (docs/fidelity.md).
Timesteps beyond max_ep_len use the last row (the authors' index would run off the table).
"""
from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from .dt import GPT, DTPolicy, GPTConfig, trajectory_mask
from .encoders import ConvEncoder, frame_scale


class AtariDecisionTransformer(nn.Module):
    """(returns (B,T), frames (B,T,ch,84,84) uint8, actions (B,T) long, timesteps (B,T))
    -> action logits (B,T,n) at the state tokens; global position from timesteps[:, -1]."""

    position_free = False

    def __init__(self, in_channels: int, n_actions: int, cfg: GPTConfig, context: int,
                 max_ep_len: int, vbn: bool = False, embed_init: str = "torch",
                 pixel_scale: float = 1 / 255):
        super().__init__()
        C = cfg.n_embd
        self.max_ep_len = max_ep_len
        self.state_encoder = ConvEncoder(in_channels, C, vbn=vbn, pixel_scale=pixel_scale)
        self.embed_return = nn.Linear(1, C)
        self.embed_action = nn.Embedding(n_actions, C)
        self.pos_emb = nn.Parameter(torch.zeros(1, 3 * context, C))
        self.global_pos_emb = nn.Parameter(torch.zeros(1, max_ep_len, C))
        self.transformer = GPT(cfg)
        self.head = nn.Linear(C, n_actions, bias=False)
        # Chen et al.'s mingpt initialises its own modules N(0, 0.02) (head, action embedding)
        # but builds the state encoder and return embedding after that: PyTorch defaults
        for m in (self.embed_action, self.head):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if embed_init == "normal":  # the GPT-style alternative for the other two
            for m in (self.embed_return, self.state_encoder.proj):
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)
        elif embed_init != "torch":
            raise ValueError(f"policy.embed_init: unknown init {embed_init!r}")

    def _global(self, t) -> torch.Tensor:
        return self.global_pos_emb[0, torch.as_tensor(t).clamp(max=self.max_ep_len - 1)]

    def forward(self, returns, frames, actions, timesteps, band: int | None = None,
                generator: torch.Generator | None = None):
        B, T = returns.shape
        r = torch.tanh(self.embed_return(returns.unsqueeze(-1)))
        s = torch.tanh(self.state_encoder(frames.reshape(B * T, *frames.shape[2:]))).view(B, T, -1)
        a = torch.tanh(self.embed_action(actions))
        x = torch.stack((r, s, a), dim=2).reshape(B, 3 * T, -1)
        x = x + self._global(timesteps[:, -1])[:, None] + self.pos_emb[:, : 3 * T]
        h = self.transformer(x, trajectory_mask(3 * T, band), generator)
        return self.head(h[:, 1::3])

    # --- one token at a time (contents only; positions are added in window_input)
    def return_token(self, rtg: float, t: int) -> torch.Tensor:
        return torch.tanh(self.embed_return.weight[:, 0] * rtg + self.embed_return.bias)

    def state_token(self, frames: torch.Tensor, t: int) -> torch.Tensor:
        return torch.tanh(self.state_encoder(frames[None]))[0]

    def action_token(self, action: torch.Tensor, t: int) -> torch.Tensor:
        return torch.tanh(self.embed_action.weight[int(action)])

    def window_input(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        return tokens + self._global(t) + self.pos_emb[0, : len(tokens)]

    def action_output(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.head.weight.t()


def make_atari_dt(cfg, observation_space: gym.Space, action_space: gym.Space,
                  obs_normalized: bool = False) -> DTPolicy:
    """Image observations (channels, 84, 84), Discrete actions.

    Raw uint8 frames are scaled by 1/255 in the encoder; frames that the run normalises per
    pixel (env.normalize_obs) arrive as float32 and are used as they are.
    """
    if not isinstance(action_space, gym.spaces.Discrete):
        raise ValueError("policy.kind dt with image observations needs a Discrete action space")
    if tuple(observation_space.shape[1:]) != (84, 84):
        raise ValueError(f"image DT expects (channels, 84, 84) frames, got "
                         f"{observation_space.shape}")
    gpt = GPTConfig(cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.inner_mult, "gelu", cfg.dropout,
                    cfg.scaled_residual_init)
    model = AtariDecisionTransformer(observation_space.shape[0], int(action_space.n), gpt,
                                     cfg.context, cfg.max_ep_len, vbn=cfg.vbn,
                                     embed_init=cfg.embed_init,
                                     pixel_scale=frame_scale(cfg, obs_normalized))
    return DTPolicy(model, action_space, tuple(observation_space.shape), cfg.context,
                    cfg.rtg_scale, cfg.target_return, cfg.inference,
                    obs_uint8=observation_space.dtype == np.uint8 and not obs_normalized,
                    discrete_action=cfg.discrete_action)
