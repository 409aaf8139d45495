"""MLP policy over one flat vector; episodes are deterministic given their seed."""
import gymnasium as gym
import numpy as np
import torch

from es_mpi.config import EnvConfig, PolicyConfig
from es_mpi.envs import episode_limit, make_env
from es_mpi.policies import make_policy
from es_mpi.rollout import Normalizer, run_episode


def _humanoid_policy(seed=0):
    env = make_env(EnvConfig(id="Humanoid-v4"))
    return make_policy(PolicyConfig(kind="mlp", hidden=[256, 256]), env.observation_space,
                       env.action_space, seed), env


def test_mlp_size_on_humanoid_v4():
    policy, env = _humanoid_policy()
    assert env.observation_space.shape == (376,)
    assert policy.num_params == 376 * 256 + 256 + 256 * 256 + 256 + 256 * 17 + 17 == 166_673


def test_parameters_are_views_of_the_flat_vector():
    policy, env = _humanoid_policy()
    obs = np.ones(376, dtype=np.float32)
    theta = policy.get_theta()
    a0 = policy.act(obs)
    policy.set_theta(np.zeros_like(theta))
    assert all(float(p.abs().sum()) == 0.0 for p in policy.parameters())
    assert np.allclose(policy.act(obs), 0.0)  # tanh(0) in symmetric bounds
    policy.set_theta(theta)
    assert np.array_equal(policy.act(obs), a0)
    eps = np.random.default_rng(0).standard_normal(theta.size).astype(np.float32)
    policy.set_perturbed(theta, eps, -0.02)
    assert np.array_equal(policy.get_theta(), theta + np.float32(-0.02) * eps)


def test_init_depends_on_seed_only():
    a, _ = _humanoid_policy(3)
    b, _ = _humanoid_policy(3)
    c, _ = _humanoid_policy(4)
    assert np.array_equal(a.get_theta(), b.get_theta())
    assert not np.array_equal(a.get_theta(), c.get_theta())


def _mlp_with_mapping(mapping, init="torch"):
    env = make_env(EnvConfig(id="Humanoid-v4"))
    cfg = PolicyConfig(kind="mlp", hidden=[256, 256], action_mapping=mapping, init=init)
    return make_policy(cfg, env.observation_space, env.action_space, 0)


def test_action_mappings():
    """tanh: [-1, 1] to the env, which clamps (Lorenc); bounds: 0.4 tanh inside Humanoid's Box;
    linear: the raw output (OpenAI)."""
    obs = np.random.default_rng(0).normal(size=376).astype(np.float32)
    raws, acts = {}, {}
    for mapping in ("tanh", "bounds", "linear"):
        policy = _mlp_with_mapping(mapping)
        policy.set_theta(policy.get_theta() * 100)
        raws[mapping] = policy.net(torch.from_numpy(obs)).numpy()
        acts[mapping] = policy.act(obs)
        assert acts[mapping].shape == (17,) and acts[mapping].dtype == np.float32
    assert np.array_equal(raws["tanh"], raws["linear"])  # same network, same init
    np.testing.assert_allclose(acts["tanh"], np.tanh(raws["tanh"]), rtol=1e-6)
    assert np.abs(acts["tanh"]).max() > 0.9  # beyond Humanoid's ±0.4: the env clamps
    np.testing.assert_allclose(acts["bounds"], 0.4 * np.tanh(raws["bounds"]), rtol=1e-5)
    assert np.array_equal(acts["linear"], raws["linear"])


def test_normc_init_is_openais():
    policy = _mlp_with_mapping("linear", init="normc")
    linears = [m for m in policy.net if isinstance(m, torch.nn.Linear)]
    for lin, std in zip(linears, (1.0, 1.0, 0.01)):
        np.testing.assert_allclose(lin.weight.norm(dim=1).numpy(), std, rtol=1e-5)
        assert float(lin.bias.abs().max()) == 0.0


def test_discrete_argmax_and_sampling():
    cart = gym.make("CartPole-v1")
    p = make_policy(PolicyConfig(kind="mlp", hidden=[8]), cart.observation_space, cart.action_space, 0)
    assert p.act(np.zeros(4, dtype=np.float32)) in (0, 1)
    s = make_policy(PolicyConfig(kind="mlp", hidden=[8], discrete_action="sample"),
                    cart.observation_space, cart.action_space, 0)
    obs = np.zeros(4, dtype=np.float32)

    def draws(seed):
        s.reset(seed=seed)
        return [s.act(obs) for _ in range(64)]

    assert draws(1) == draws(1) and draws(1) != draws(2)  # seeded per episode
    assert 0 < sum(draws(1)) < 64  # a near-uniform softmax: both actions appear


def test_episodes_repeat_with_the_same_seed_and_honour_the_cap():
    env = make_env(EnvConfig(id="Hopper-v5"))
    policy = make_policy(PolicyConfig(hidden=[16]), env.observation_space, env.action_space, 0)
    norm = Normalizer()
    a = run_episode(env, policy, 11, 1000, norm, record_obs=True)
    b = run_episode(env, policy, 11, 1000, norm, record_obs=True)
    assert (a.ret, a.length) == (b.ret, b.length)
    assert np.array_equal(a.obs_sum, b.obs_sum) and a.obs_count == a.length
    capped = run_episode(env, policy, 11, 3, norm)
    assert capped.length == min(3, a.length)
    assert episode_limit(env) == 1000


def test_normalizer_clips_only_when_asked():
    norm = Normalizer(np.array([1.0, 0.0]), np.array([2.0, 0.1]))  # Lorenc: no clipping
    np.testing.assert_allclose(norm(np.array([3.0, 1.0])), [1.0, 10.0], rtol=1e-6)
    assert norm(np.zeros(2, dtype=np.float64)).dtype == np.float32
    openai = Normalizer(np.array([1.0, 0.0]), np.array([2.0, 0.1]), clip=5.0)
    np.testing.assert_allclose(openai(np.array([3.0, 1.0])), [1.0, 5.0], rtol=1e-6)


def test_action_noise_is_seeded_per_episode():
    env = make_env(EnvConfig(id="Hopper-v5"))
    policy = make_policy(PolicyConfig(hidden=[16]), env.observation_space, env.action_space, 0)
    run = lambda es, std: run_episode(env, policy, 11, 50, Normalizer(), episode_seed=es,  # noqa
                                      action_noise_std=std)
    clean = run(None, 0.0)
    assert run(7, 0.01).ret == run(7, 0.01).ret != clean.ret != run(8, 0.01).ret


def test_torch_threads_untouched_by_import():
    assert torch.get_num_threads() >= 1
