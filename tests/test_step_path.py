"""The lean per-step path gives the same episodes and the same bits as the wrapped env and the
module forwards it replaces."""
from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from es_mpi.config import EnvConfig, PolicyConfig
from es_mpi.envs import lean_step, make_env
from es_mpi.policies import make_policy
from es_mpi.policies.dt import DropoutWindow
from es_mpi.rollout import Normalizer, run_episode

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:.*is out of date")  # Humanoid-v4: the paper's env


class Recording:
    """A policy's episode interface around `policy`, keeping every observation it is shown."""

    def __init__(self, policy):
        self.policy, self.seen = policy, []

    def reset(self, target_return=None, seed=None):
        self.seen = []
        self.policy.reset(target_return, seed=seed)

    def act(self, obs):
        self.seen.append(np.array(obs))
        return self.policy.act(obs)

    def observe(self, reward):
        self.policy.observe(reward)


def episodes(env, policy, lean: bool, seeds, cap: int):
    out = []
    for seed in seeds:
        rec = Recording(policy)
        res = run_episode(env, rec, seed, cap, Normalizer(), record_obs=True,
                          episode_seed=seed, lean=lean)
        out.append((res.ret, res.length, res.terminated, res.obs_sum.tobytes(),
                    np.array(rec.seen).tobytes()))
    return out


@pytest.mark.parametrize("env_id, steps, cap", [
    ("HalfCheetah-v5", 40, 1000),  # truncated by the TimeLimit
    ("Hopper-v5", None, 1000),  # terminates
    ("Humanoid-v4", 30, 25),  # the rollout's cap before the TimeLimit
    ("Pendulum-v1", 30, 1000),  # classic control, Box actions
    ("CartPole-v1", None, 1000),  # classic control, discrete
])
def test_lean_env_gives_the_wrapped_episodes(env_id, steps, cap):
    env = make_env(EnvConfig(id=env_id, max_episode_steps=steps))
    assert lean_step(env).step.__self__ is env.unwrapped  # the shortcut is taken
    policy = make_policy(PolicyConfig(hidden=[16]), env.observation_space, env.action_space, 0)
    theta = policy.get_theta()
    policy.set_theta(theta + np.float32(0.5) * np.sign(theta))  # livelier than the init
    seeds = [3, 4, 5]
    lean, wrapped = episodes(env, policy, True, seeds, cap), episodes(env, policy, False, seeds, cap)
    assert lean == wrapped
    limit = steps or env.spec.max_episode_steps
    for ret, length, terminated, *_ in lean:
        assert length <= min(cap, limit)
        assert terminated or length == min(cap, limit)


def test_lean_step_replays_the_smallest_time_limit_and_keeps_unknown_wrappers():
    env = make_env(EnvConfig(id="Hopper-v5", max_episode_steps=50))
    assert lean_step(env).limit == 50
    nested = gym.wrappers.TimeLimit(env, max_episode_steps=7)
    assert lean_step(nested).limit == 7 and lean_step(nested).step.__self__ is env.unwrapped
    clipped = gym.wrappers.ClipAction(env)  # a wrapper that changes the step: not skipped
    shortcut = lean_step(clipped)
    assert shortcut.step == clipped.step and shortcut.limit is None
    policy = make_policy(PolicyConfig(hidden=[8]), env.observation_space, env.action_space, 0)
    a = run_episode(nested, policy, 1, 1000, Normalizer())
    b = run_episode(nested, policy, 1, 1000, Normalizer(), lean=False)
    assert (a.ret, a.length, a.terminated) == (b.ret, b.length, b.terminated) and a.length <= 7


def test_atari_env_keeps_its_wrapped_step():
    pytest.importorskip("ale_py")
    env = make_env(EnvConfig(id="ALE/Hero-v5", normalize_obs=False, max_frames=80))
    shortcut = lean_step(env)
    assert shortcut.step == env.step and shortcut.limit is None


def test_normaliser_into_a_buffer_has_the_same_bits():
    rng = np.random.default_rng(0)
    for clip in (None, 0.5):
        norm = Normalizer(rng.normal(size=11), rng.uniform(0.1, 2, 11), clip)
        buf = np.empty(11, np.float32)
        for obs in (rng.normal(size=11), rng.normal(size=11).astype(np.float32)):
            assert np.array_equal(norm(obs, buf), norm(obs)) and norm(obs, buf) is buf


@pytest.mark.parametrize("hidden, activation, mapping", [
    ([64, 64], "tanh", "tanh"), ([256, 256], "tanh", "bounds"), ([32], "relu", "linear")])
def test_lean_mlp_forward_is_bitwise_the_modules(hidden, activation, mapping):
    env = make_env(EnvConfig(id="Humanoid-v4"))
    policy = make_policy(PolicyConfig(hidden=hidden, activation=activation,
                                      action_mapping=mapping), env.observation_space,
                         env.action_space, 0)
    rng = np.random.default_rng(1)
    theta = policy.get_theta()
    for k in range(3):  # new theta in place, as set_perturbed writes it: no refresh needed
        policy.set_perturbed(theta, rng.standard_normal(theta.size).astype(np.float32), 0.3)
        for obs in rng.normal(scale=3, size=(20, 376)):
            ref = policy.net(torch.from_numpy(obs.astype(np.float32)))
            assert torch.equal(policy._lean(obs), ref)
            assert np.array_equal(policy.act(obs), policy.head(ref))


def _dt_outputs(policy, obs: np.ndarray, seed: int, modules: bool) -> list:
    """Raw action outputs of one episode, the window run by the GPT modules or lean."""
    if modules:
        policy._window_step_dropout = policy._window_step_modules
    try:
        policy.reset(seed=seed)
        out = []
        for o in obs:
            policy.act(o)
            policy.observe(float(o[0]))
            out.append(policy.last_output.clone())
        return out + [policy.generator.get_state()]
    finally:
        policy.__dict__.pop("_window_step_dropout", None)


@pytest.mark.parametrize("n_head, context, n_layer", [(1, 20, 3), (4, 20, 2), (8, 6, 2)])
def test_dropout_window_is_the_modules(n_head, context, n_layer, monkeypatch):
    """The lean dropout window (the paper job's path: dropout 0.1 in every rollout) against
    the GPT modules on the same cached tokens, at every window length, past the context too:
    the same masks drawn (the generator ends in the same state) and the same outputs — bitwise
    without the last block's row cut, to float32 rounding with it (whether a GEMM row depends
    on the row count is the CPU's and MKL's choice; DropoutWindow's docstring)."""
    env = make_env(EnvConfig(id="Humanoid-v4"))
    cfg = PolicyConfig(kind="dt", dropout=0.1, n_head=n_head, context=context, n_layer=n_layer)
    rng = np.random.default_rng(2)
    obs = rng.normal(size=(context + 6, 376)).astype(np.float32)
    noise = rng.standard_normal(10**6)

    def outputs(last_rows: int) -> tuple[list, list]:
        monkeypatch.setattr(DropoutWindow, "LAST_ROWS", last_rows)
        policy = make_policy(cfg, env.observation_space, env.action_space, 0)
        theta = policy.get_theta()
        policy.set_theta((theta + 0.03 * noise[:theta.size]).astype(np.float32))
        return _dt_outputs(policy, obs, 5, False), _dt_outputs(policy, obs, 5, True)

    shipped = DropoutWindow.LAST_ROWS
    lean, ref = outputs(3 * context)  # no row cut: the modules' ops, shapes and order
    assert all(torch.equal(a, b) for a, b in zip(lean, ref))
    lean, ref = outputs(shipped)
    assert torch.equal(lean[-1], ref[-1])  # the same masks were drawn
    for a, b in zip(lean[:-1], ref[:-1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
