"""Decision Transformer policies: sizes, exactness of the per-step paths, episode interface."""
from __future__ import annotations

import dataclasses

import gymnasium as gym
import numpy as np
import pytest
import torch

from es_mpi.config import ConfigError, PolicyConfig, from_dict
from es_mpi.policies import make_policy

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:.*is out of date")  # Humanoid-v4: the paper's env
REQ = {"run": {"seed": 0, "iterations": 1, "dir": "x"}, "es": {"population": 1, "sigma": 0.1}}


def humanoid():
    return gym.make("Humanoid-v4", disable_env_checker=True, terminate_when_unhealthy=False)


def randomized(policy, seed: int = 0, scale: float = 0.3):
    """Random theta with larger weights than the init, so outputs vary and saturate less."""
    rng = np.random.default_rng(seed)
    theta = policy.get_theta()
    policy.set_theta((theta + scale * rng.standard_normal(theta.size) / 10).astype(np.float32))
    return policy


def play(env, policy, steps: int, seed: int, check, target_return=None):
    """Step the env with the policy for `steps` steps (resetting on episode end), calling
    check(policy, t) after each act()."""
    obs, _ = env.reset(seed=seed)
    policy.reset(target_return)
    for t in range(steps):
        action = policy.act(np.asarray(obs, dtype=np.float32) / 10
                            if obs.dtype != np.uint8 else obs)
        check(policy, t, action)
        obs, reward, term, trunc, _ = env.step(action)
        policy.observe(float(reward))
        if term or trunc:
            obs, _ = env.reset(seed=seed + 1)
            policy.reset(target_return)


def test_humanoid_dt_size_is_the_papers():
    env = humanoid()
    policy = make_policy(PolicyConfig(kind="dt"), env.observation_space, env.action_space, 0)
    assert env.observation_space.shape == (376,)
    assert policy.num_params == 824_970  # ~825K (Lorenc & Neruda); breakdown in dt.py


def test_atari_dt_size():
    frames = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
    cfg = PolicyConfig(kind="dt", context=30, n_layer=6, n_head=8, max_ep_len=6300)
    policy = make_policy(cfg, frames, gym.spaces.Discrete(18), 0)
    assert policy.num_params == 1_685_792 + 128 * 6300 == 2_492_192  # ~2.49M


@pytest.mark.parametrize("inference", ["window", "kv_cache", "full"])
def test_same_seed_same_theta_and_actions(inference):
    env = humanoid()
    cfg = PolicyConfig(kind="dt", context=5, inference=inference)
    a = make_policy(cfg, env.observation_space, env.action_space, 7)
    b = make_policy(cfg, env.observation_space, env.action_space, 7)
    assert np.array_equal(a.get_theta(), b.get_theta())
    acts = []
    play(env, randomized(a), 12, 3, lambda p, t, act: acts.append(act))
    play(env, randomized(b), 12, 3, lambda p, t, act: acts.append(act))
    assert all(np.array_equal(x, y) for x, y in zip(acts[:12], acts[12:]))


def test_window_path_equals_full_forward_every_step():
    """The exact path (cached tokens, cached block-0 q/k/v, last block for s_t only) against a
    full forward pass over the same window, through the ring's wrap-around (> 2K steps)."""
    env = humanoid()
    policy = randomized(make_policy(PolicyConfig(kind="dt", inference="window"),
                                    env.observation_space, env.action_space, 0))
    diffs = []

    def check(p, t, action):
        ref = p.full_forward()
        diffs.append(float((p.last_output - ref).abs().max()))
        assert np.allclose(action, p.head(ref), atol=1e-5)

    play(env, policy, 45, 0, check)
    assert max(diffs) < 1e-5
    assert policy.ring.len == 20  # the window is full: the comparison covered the sliding part


@pytest.mark.parametrize("n_head", [1, 4])
def test_kv_cache_equals_banded_full_forward(n_head):
    """Incremental K/V cache == full forward over the whole history with the banded mask;
    and == the plain window forward while the episode is shorter than the context."""
    env = humanoid()
    K = 4
    cfg = PolicyConfig(kind="dt", context=K, n_head=n_head, inference="kv_cache")
    policy = randomized(make_policy(cfg, env.observation_space, env.action_space, 0))
    hist = {"r": [], "s": [], "a": [], "t": []}
    obs, _ = env.reset(seed=5)
    policy.reset(3000.0)
    rtg = 3000.0 * policy.rtg_scale
    for t in range(3 * K + 5):  # > 2(K+1): the ring wraps around
        x = np.asarray(obs, dtype=np.float32) / 10
        action = policy.act(x)
        hist["r"].append(rtg), hist["s"].append(x), hist["a"].append(action), hist["t"].append(t)
        args = (torch.tensor([hist["r"]], dtype=torch.float32), torch.tensor(np.array([hist["s"]])),
                torch.tensor(np.array([hist["a"]])), torch.tensor([hist["t"]]))
        with torch.no_grad():
            banded = policy.model(*args, band=K)[0, -1]
            plain = policy.model(*[a[:, -K:] for a in args])[0, -1]
        assert float((policy.last_output - banded).abs().max()) < 1e-5, t
        if t < K:
            assert float((policy.last_output - plain).abs().max()) < 1e-5, t
        obs, reward, term, trunc, _ = env.step(action)
        assert not (term or trunc)
        policy.observe(float(reward))
        rtg -= float(reward) * policy.rtg_scale
    assert policy.ring.len == K  # streaming window of K timesteps (K+1 held mid-step)


def test_return_to_go_is_lowered_by_each_reward():
    env = humanoid()
    policy = make_policy(PolicyConfig(kind="dt", rtg_scale=0.001), env.observation_space,
                         env.action_space, 0)
    policy.reset(1000.0)
    obs = np.zeros(376, np.float32)
    policy.act(obs)
    policy.observe(10.0)
    policy.act(obs)
    policy.observe(-5.0)
    policy.act(obs)
    lo = policy.ring.start
    assert np.allclose(policy._rtg[lo:lo + 3].numpy(), [1.0, 0.99, 0.995])
    assert policy._timesteps[lo:lo + 3].tolist() == [0, 1, 2]
    policy.reset()  # None -> policy.target_return from the config
    assert policy._rtg_now == pytest.approx(PolicyConfig().target_return * 0.001)


@pytest.mark.parametrize("inference", ["window", "kv_cache"])
def test_discrete_vector_dt_on_cartpole(inference):
    env = gym.make("CartPole-v1", disable_env_checker=True)
    cfg = PolicyConfig(kind="dt", context=6, n_embd=32, n_layer=2, n_head=2,
                       max_ep_len=500, inference=inference)
    policy = randomized(make_policy(cfg, env.observation_space, env.action_space, 0), scale=3)
    seen = set()

    def check(p, t, action):
        assert isinstance(action, int) and action in (0, 1)
        seen.add(action)
        if inference == "window":
            assert float((p.last_output - p.full_forward()).abs().max()) < 1e-5

    play(env, policy, 40, 0, check)
    assert policy.model.embed_action.weight.shape == (2, 32)  # embedding of action indices
    assert seen == {0, 1}  # argmax over both logits is exercised


class Nearest84(gym.ObservationWrapper):
    """Greyscale ALE frame (210, 160) -> (84, 84) by nearest-neighbour sampling."""

    def __init__(self, env):
        super().__init__(env)
        h, w = env.observation_space.shape
        self._rows = np.linspace(0, h - 1, 84).astype(int)
        self._cols = np.linspace(0, w - 1, 84).astype(int)
        self.observation_space = gym.spaces.Box(0, 255, (84, 84), np.uint8)

    def observation(self, obs):
        return obs[self._rows][:, self._cols]


def test_image_dt_on_ale_frames_equals_full_forward():
    ale_py = pytest.importorskip("ale_py")
    gym.register_envs(ale_py)
    env = gym.wrappers.FrameStackObservation(
        Nearest84(gym.make("ALE/Pong-v5", obs_type="grayscale", disable_env_checker=True)), 4)
    # N(0, 0.02) embeddings keep the logits O(1), so float32 rounding stays below 1e-5
    cfg = PolicyConfig(kind="dt", context=4, n_layer=2, n_head=8, max_ep_len=100,
                       embed_init="normal")
    policy = randomized(make_policy(cfg, env.observation_space, env.action_space, 0), scale=2)
    assert type(policy.model).__name__ == "AtariDecisionTransformer"
    assert policy._states.dtype == torch.uint8
    diffs = []

    def check(p, t, action):
        ref = p.full_forward()
        diffs.append(float((p.last_output - ref).abs().max() / ref.abs().max()))
        assert action == int(torch.argmax(ref))

    play(env, policy, 12, 0, check, target_return=20.0)  # > 2K: the ring wraps around
    # float32 rounding: < 1e-5 on this machine's default kernels, 1.4e-5 with the AVX2 ones that
    # es_mpi pins (MKL_CBWR=AVX2, set in this process once any module imports es_mpi.run)
    assert max(diffs) < 3e-5


def test_image_dt_rejects_normalised_frames():
    frames = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
    policy = make_policy(PolicyConfig(kind="dt", n_layer=1, n_head=1, context=2), frames,
                         gym.spaces.Discrete(4), 0)
    policy.reset()
    assert policy.act(np.zeros((4, 84, 84), np.uint8)) in range(4)
    with pytest.raises(ValueError, match="normalize_obs"):
        policy.act(np.zeros((4, 84, 84), np.float32))
    # with per-pixel normalisation (Lorenc's Atari input) the frames arrive as float32
    normed = make_policy(PolicyConfig(kind="dt", n_layer=1, n_head=1, context=2), frames,
                         gym.spaces.Discrete(4), 0, obs_normalized=True)
    assert normed._states.dtype == torch.float32
    assert normed.model.state_encoder.pixel_scale == 1.0
    normed.reset()
    assert normed.act(np.random.default_rng(0).normal(size=(4, 84, 84)).astype(np.float32)) \
        in range(4)


@pytest.mark.parametrize("inference", ["window", "full"])
def test_dt_dropout_is_seeded_per_episode(inference):
    """Dropout stays active (as in the references' ES rollouts); its masks depend on the
    episode seed only, so an episode repeats exactly and another seed differs."""
    env = gym.make("Hopper-v5")
    cfg = PolicyConfig(kind="dt", context=5, n_layer=2, n_head=1, max_ep_len=100,
                       dropout=0.1, inference=inference)
    policy = make_policy(cfg, env.observation_space, env.action_space, 0)
    obs = np.random.default_rng(0).normal(size=(12, 11)).astype(np.float32)

    def episode(seed):
        policy.reset(seed=seed)
        out = [policy.act(o) for o in obs]
        return np.stack(out)

    assert np.array_equal(episode(3), episode(3))
    assert not np.array_equal(episode(3), episode(4))
    quiet = make_policy(dataclasses.replace(cfg, dropout=0.0), env.observation_space,
                        env.action_space, 0)
    assert np.array_equal(quiet.get_theta(), policy.get_theta())  # same parameters


def test_image_dt_samples_actions_from_the_softmax():
    frames = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
    cfg = PolicyConfig(kind="dt", n_layer=1, n_head=1, context=3, discrete_action="sample")
    policy = make_policy(cfg, frames, gym.spaces.Discrete(6), 0)
    obs = np.random.default_rng(1).integers(0, 255, (20, 4, 84, 84), dtype=np.uint8)

    def episode(seed):
        policy.reset(seed=seed)
        return [policy.act(o) for o in obs]

    assert episode(5) == episode(5) and episode(5) != episode(6)
    assert len(set(episode(5))) > 1


def test_image_dt_rejects_kv_cache():
    frames = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
    with pytest.raises(ValueError, match="kv_cache"):
        make_policy(PolicyConfig(kind="dt", inference="kv_cache"), frames,
                    gym.spaces.Discrete(4), 0)


def test_config_checks_dt_keys():
    cfg = from_dict({**REQ, "policy": {"kind": "dt", "n_head": 4, "inference": "kv_cache"}})
    assert cfg.policy.kind == "dt" and cfg.policy.context == 20
    with pytest.raises(ConfigError, match="policy.n_head"):
        from_dict({**REQ, "policy": {"kind": "dt", "n_head": 3}})
    with pytest.raises(ConfigError, match="policy.inference"):
        from_dict({**REQ, "policy": {"kind": "dt", "inference": "fast"}})
    with pytest.raises(ConfigError, match="policy.context"):
        from_dict({**REQ, "policy": {"kind": "dt", "context": 0}})
