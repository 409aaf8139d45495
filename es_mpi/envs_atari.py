"""Atari through ale-py: `ALE/...` ids with the paper's preprocessing (Machado et al. 2018).

The semantics are those of gymnasium's `AtariPreprocessing` followed by
`FrameStackObservation(4)`:
- reset: 1..noop_max no-op steps, the count drawn from the env's np_random seeded by reset(seed);
- step: the action is repeated `frame_skip` frames, rewards summed (never clipped by default),
  the observation is the pixel-wise max of the last two frames (Atari flicker), taken of the
  raw screens before the resize (gymnasium; `env.pool_order: max_then_resize`) or of the two
  resized frames (Lorenc & Neruda's ALE wrapper; `resize_then_max`);
- frames are greyscale, area-resized to 84x84, and the last 4 are stacked: (4, 84, 84) uint8,
  oldest first; after reset the stack holds zeros and the first frame (Lorenc & Neruda's
  wrapper; `env.frame_stack_reset: zeros`) or the first frame repeated (gymnasium's default);
- no sticky actions; the ALE truncates an episode at `max_frames` emulator frames (no-ops count).

It is written here rather than composed from gymnasium's wrappers for three reasons:
gymnasium's wrapper needs OpenCV (not a dependency of this project); it grabs an RGB screen
on every emulator frame through `AtariEnv.step` (we read greyscale twice per agent step
from the ALE); and `AtariEnv.reset(seed)` reloads the ROM (about 0.1 s) where restoring a
snapshot of the freshly reset emulator gives the same bits in 0.1 ms. The resize is an exact
integer area average (float32 sums of integers below 2**24), so frames are bitwise identical
on every CPU whatever BLAS kernel runs, which the rank-count invariance relies on.
"""
from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from .config import ConfigError

_registered = False


def is_atari(env_id: str) -> bool:
    return env_id.startswith("ALE/")


def _register() -> None:
    global _registered
    if not _registered:
        import ale_py
        gym.register_envs(ale_py)
        _registered = True


def area_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) integer weights of an area resize: output i averages input span
    [i, i+1) * n_in/n_out; W[i, k] = overlap(pixel k, span i) * n_out, so every row sums to n_in."""
    w = np.zeros((n_out, n_in), dtype=np.int64)
    for i in range(n_out):
        lo, hi = i * n_in, (i + 1) * n_in  # span in units of 1/n_out input pixels
        for k in range(lo // n_out, -(-hi // n_out)):
            w[i, k] = min(hi, (k + 1) * n_out) - max(lo, k * n_out)
    return w


class AreaResize:
    """uint8 (H, W) -> uint8 (size, size): area average rounded half up, exact in float32."""

    def __init__(self, shape: tuple[int, int], size: int):
        h, w = shape
        self.wy = area_weights(h, size).astype(np.float32)  # (size, H)
        self.wxt = area_weights(w, size).T.astype(np.float32).copy()  # (W, size)
        self.denom = h * w
        if 255 * self.denom >= 2**24:
            raise ValueError(f"frame {shape} too large for an exact float32 area resize")

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        acc = (self.wy @ frame.astype(np.float32)) @ self.wxt  # integers < 2**24: exact
        return ((acc.astype(np.int32) + self.denom // 2) // self.denom).astype(np.uint8)


def max_then_resize(a: np.ndarray, b: np.ndarray, resize) -> np.ndarray:
    """The pixel max of two raw screens, resized (gymnasium's AtariPreprocessing)."""
    return resize(np.maximum(a, b))


def resize_then_max(a: np.ndarray, b: np.ndarray, resize) -> np.ndarray:
    """The pixel max of the two resized screens (Lorenc & Neruda's ALE wrapper: each frame
    through cv2.resize INTER_AREA, then the max of the pair)."""
    return np.maximum(resize(a), resize(b))


# env.pool_order -> (screen, screen, resize) -> the step's frame
POOL_ORDERS = {"max_then_resize": max_then_resize, "resize_then_max": resize_then_max}


class AtariPreprocessing(gym.Wrapper):
    """No-op starts, frame skip with max-pool, greyscale area resize, frame stack (see module)."""

    def __init__(self, env: gym.Env, noop_max: int = 30, frame_skip: int = 4,
                 screen_size: int = 84, frame_stack: int = 4, max_pool: bool = True,
                 terminal_on_life_loss: bool = False, clip_rewards: bool = False,
                 fast_reset: bool = True, stack_reset: str = "zeros",
                 pool_order: str = "max_then_resize"):
        super().__init__(env)
        ale_env = env.unwrapped
        if getattr(ale_env, "_frameskip", None) != 1:
            raise ValueError("make the ALE env with frameskip=1; this wrapper skips frames")
        if noop_max > 0 and ale_env.get_action_meanings()[0] != "NOOP":
            raise ValueError("noop starts need action 0 to be NOOP")
        self.ale = ale_env.ale
        self.action_set = ale_env._action_set
        self.noop_max, self.frame_skip, self.max_pool = noop_max, frame_skip, max_pool
        if stack_reset not in ("zeros", "repeat"):
            raise ValueError(f"env.frame_stack_reset: unknown mode {stack_reset!r}")
        self.stack_reset = stack_reset
        if pool_order not in POOL_ORDERS:
            raise ValueError(f"env.pool_order: unknown order {pool_order!r}")
        self.pool = POOL_ORDERS[pool_order]
        self.terminal_on_life_loss, self.clip_rewards = terminal_on_life_loss, clip_rewards
        h, w = self.ale.getScreenDims()
        self.resize = AreaResize((h, w), screen_size)
        self.screens = np.zeros((2, h, w), dtype=np.uint8)  # last two frames of a step
        self.stack = np.zeros((frame_stack, screen_size, screen_size), dtype=np.uint8)
        self.observation_space = gym.spaces.Box(0, 255, self.stack.shape, dtype=np.uint8)
        # The snapshot is valid only without sticky actions: with them the ALE's own RNG
        # (seeded at ROM load) matters, so every seeded reset reloads the ROM.
        self.fast_reset = fast_reset and ale_env.ale.getFloat("repeat_action_probability") == 0
        self._snapshot = None
        self._snapshot_screen = None  # the greyscale screen of the snapshot's state
        self.lives = 0

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        ale_env = self.env.unwrapped
        restored = self._snapshot is not None and seed is not None and not options
        if restored:
            ale_env.seed_game(seed)  # the np_random (no-op count) AtariEnv.reset(seed) sets
            self.ale.restoreState(self._snapshot)
            info = {}
        else:
            _, info = self.env.reset(seed=seed, options=options)
            if self.fast_reset:
                self._snapshot = self.ale.cloneState(include_rng=True)
                self._snapshot_screen = self.ale.getScreenGrayscale()
        noops = int(ale_env.np_random.integers(1, self.noop_max + 1)) if self.noop_max else 0
        for _ in range(noops):
            self.ale.act(self.action_set[0])
            if self.ale.game_over():  # with_truncation: a cap below the no-ops also restarts
                _, info = self.env.reset(seed=seed, options=options)
        self.lives = self.ale.lives()
        if restored and not noops:  # restoreState leaves the last episode's screen in place
            self.screens[0] = self._snapshot_screen
        else:
            self.ale.getScreenGrayscale(self.screens[0])
        self.stack[:] = 0 if self.stack_reset == "zeros" else self.resize(self.screens[0])
        self.stack[-1] = self.resize(self.screens[0])
        return self.stack.copy(), info

    def step(self, action) -> tuple[np.ndarray, float, bool, bool, dict]:
        ale, a = self.ale, self.action_set[int(action)]
        total, terminated, truncated = 0.0, False, False
        last = self.frame_skip - 1
        for t in range(self.frame_skip):
            total += ale.act(a)
            terminated = ale.game_over(with_truncation=False)
            truncated = ale.game_truncated()
            if self.terminal_on_life_loss:
                lives = ale.lives()
                terminated = terminated or lives < self.lives
                self.lives = lives
            if terminated or truncated:
                last = t
                break
            if t == self.frame_skip - 2 and self.max_pool:
                ale.getScreenGrayscale(self.screens[1])
        ale.getScreenGrayscale(self.screens[0])
        self.stack[:-1] = self.stack[1:]
        if self.max_pool and self.frame_skip > 1 and last == self.frame_skip - 1:
            self.stack[-1] = self.pool(self.screens[0], self.screens[1], self.resize)
        else:
            self.stack[-1] = self.resize(self.screens[0])
        reward = float(np.sign(total)) if self.clip_rewards else total
        return self.stack.copy(), reward, terminated, truncated, {"lives": ale.lives()}


def make_atari_env(cfg, render_mode: str | None = None) -> gym.Env:
    """`ALE/Game-v5` with frameskip 1 underneath and the preprocessing of an `EnvConfig`."""
    _register()
    kwargs = dict(cfg.kwargs)
    kwargs.update(frameskip=1, repeat_action_probability=cfg.repeat_action_probability,
                  full_action_space=cfg.full_action_space,
                  max_num_frames_per_episode=cfg.max_frames)
    if render_mode is not None:
        kwargs["render_mode"] = render_mode
    try:
        env = gym.make(cfg.id, disable_env_checker=True, **kwargs)
    except gym.error.Error as exc:
        raise ConfigError(f"env.id: cannot make environment {cfg.id!r}: {exc}") from None
    wrapped = AtariPreprocessing(env, noop_max=cfg.noop_max, frame_skip=cfg.frame_skip,
                                 screen_size=cfg.screen_size, frame_stack=cfg.frame_stack,
                                 max_pool=cfg.max_pool_frames,
                                 terminal_on_life_loss=cfg.terminal_on_life_loss,
                                 clip_rewards=cfg.clip_rewards,
                                 stack_reset=cfg.frame_stack_reset,
                                 pool_order=cfg.pool_order,
                                 # a snapshot restore leaves the old RGB screen for render()
                                 fast_reset=render_mode is None)
    # agent steps the frame cap allows; env.max_episode_steps may lower it further
    steps = -(-cfg.max_frames // cfg.frame_skip)
    if cfg.max_episode_steps is not None:
        steps = min(steps, cfg.max_episode_steps)
    wrapped.max_agent_steps = steps
    return wrapped


def random_policy_observations(env: gym.Env, seed: int, count: int,
                               keep_prob: float = 0.1) -> np.ndarray:
    """`count` observations of a uniformly random policy, a function of `seed` only.

    Each step's observation is kept with probability `keep_prob`, and one episode gives at
    most a quarter of them, so the batch spans several no-op starts and stages of play.
    Used for the virtual-batch-norm reference batch (Salimans et al. 2017).
    """
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 0x7B_B0])))
    n_actions = int(env.action_space.n)
    per_episode = max(1, count // 4)
    out: list[np.ndarray] = []
    while len(out) < count:
        obs, _ = env.reset(seed=int(rng.integers(0, 2**31 - 1)))
        taken, done = 0, False
        while not done and taken < per_episode and len(out) < count:
            if rng.random() < keep_prob:
                out.append(obs)
                taken += 1
            obs, _, terminated, truncated, _ = env.step(int(rng.integers(n_actions)))
            done = terminated or truncated
    return np.stack(out)
