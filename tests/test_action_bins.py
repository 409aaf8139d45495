"""OpenAI's binned actions (policy.action_bins, their MujocoPolicy ac_bins): the bin values on
hand-computed cases, the scores layer's shape, layout and init, the configuration errors, theta
bitwise equal at 1, 2 and 3 ranks with bins on, and a binned checkpoint acting in evaluate and
collect."""
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

from es_mpi.config import ConfigError, load_job, parse_action_bins
from es_mpi.policies.mlp import BinnedActionHead, MLPPolicy, bin_values
from mpi_helpers import REPO, TINY, child_env, final_theta_and_rows, run_job

BOX = gym.spaces.Box(low=np.array([-1.0, 0.0], np.float32), high=np.array([1.0, 2.0], np.float32))


@pytest.mark.parametrize("spec, parsed", [
    ("continuous", ("continuous", 0, ())),
    ("uniform:2", ("uniform", 2, ())),
    ("uniform:11", ("uniform", 11, ())),
    ("custom:-1,1", ("custom", 2, (-1.0, 1.0))),
    ("custom:-1,-0.25,0.5,1", ("custom", 4, (-1.0, -0.25, 0.5, 1.0))),
])
def test_parse_action_bins(spec, parsed):
    assert parse_action_bins(spec) == parsed


@pytest.mark.parametrize("spec", ["uniform:1", "uniform:0", "uniform:x", "uniform:", "uniform",
                                  "custom:", "custom:-1", "custom:0,1", "custom:-1,0",
                                  "custom:-1,2,1", "custom:-1,a,1", "bins:3", "continuous:3"])
def test_bad_action_bins_is_a_configuration_error(spec):
    with pytest.raises(ConfigError, match="policy.action_bins: must be continuous, uniform:N"):
        load_job(REPO / "jobs/quickstart.yaml", [f"policy.action_bins='{spec}'"])


def test_action_bins_need_an_mlp():
    with pytest.raises(ConfigError, match="binned actions are an MLP option"):
        load_job(REPO / "jobs/quickstart_dt.yaml", ["policy.action_bins=uniform:3"])


def test_uniform_bins_by_hand():
    table = bin_values("uniform", 3, (), BOX.low, BOX.high)
    assert table.dtype == np.float32
    assert np.array_equal(table, [[-1, 0, 1], [0, 1, 2]])
    # Humanoid's ±0.4 in five bins, in float32 as theirs: f32(1/4) * i * f32(0.8) + f32(-0.4)
    low, high = np.full(1, -0.4, np.float32), np.full(1, 0.4, np.float32)
    five = bin_values("uniform", 5, (), low, high)[0]
    assert np.allclose(five, [-0.4, -0.2, 0.0, 0.2, 0.4], atol=1e-7)
    assert five[3] == np.float32(np.float32(0.75) * np.float32(0.8) + np.float32(-0.4))
    assert five[0] == low[0] and five[-1] == high[0]


def test_custom_bins_by_hand():
    # (high - low) / 2 * (v + 1) + low: [-1, 1] -> [-1, -0.5, 1], [0, 2] -> [0, 0.5, 2]
    table = bin_values("custom", 3, (-1.0, -0.5, 1.0), BOX.low, BOX.high)
    assert table.dtype == np.float32
    assert np.array_equal(table, [[-1, -0.5, 1], [0, 0.5, 2]])


def test_head_takes_the_argmax_of_each_dimension_first_on_ties():
    head = BinnedActionHead(BOX, "uniform:3")
    assert (head.size, head.act_dim, head.bins) == (6, 2, 3)
    # dimension-major: scores[0:3] are dimension 0's bins, scores[3:6] dimension 1's
    scores = torch.tensor([0.1, 0.5, 0.2, 0.9, 0.9, -1.0])
    assert head.indices(scores).tolist() == [1, 0]  # the tie 0.9 / 0.9 -> the first bin
    action = head(scores)
    assert action.dtype == np.float32 and np.array_equal(action, [0.0, 0.0])
    assert np.array_equal(head(torch.tensor([3.0, 0, 0, 0, 0, 7.0])), [-1.0, 2.0])
    assert np.array_equal(head(torch.zeros(6)), [-1.0, 0.0])  # all tied: the first bins


def test_head_refuses_discrete_and_unbounded_actions():
    with pytest.raises(ValueError, match="need a Box action space"):
        BinnedActionHead(gym.spaces.Discrete(3), "uniform:3")
    with pytest.raises(ValueError, match="finite action bounds"):
        BinnedActionHead(gym.spaces.Box(-np.inf, np.inf, (2,), np.float32), "uniform:3")
    with pytest.raises(ValueError, match="no gradient"):
        BinnedActionHead(BOX, "uniform:3").continuous(torch.zeros(6))


def test_binned_mlp_layers_count_and_normc_scores():
    torch.manual_seed(0)
    pol = MLPPolicy(5, BOX, hidden=[4, 3], init="normc", action_bins="custom:-1,0,0.5,1")
    shapes = [tuple(p.shape) for p in pol.parameters()]
    assert shapes == [(4, 5), (4,), (3, 4), (3,), (2 * 4, 3), (2 * 4,)]  # one dense layer
    assert pol.num_params == 4 * 5 + 4 + 3 * 4 + 3 + 8 * 3 + 8
    scores = pol.net[-1]
    assert np.allclose(scores.weight.square().sum(dim=1).sqrt().numpy(), 0.01)  # normc(0.01)
    assert not scores.bias.any()


def test_binned_mlp_acts_through_the_bias_layout():
    """Zero weights and a bias that favours one bin per dimension: the act() path (LeanMLP and
    the head) picks exactly those bins' values."""
    pol = MLPPolicy(3, BOX, hidden=[2], action_bins="uniform:4")
    theta = np.zeros(pol.num_params, np.float32)
    theta[-8:] = [0, 0, 1, 0, 5, 0, 0, 0]  # dimension 0 -> bin 2, dimension 1 -> bin 0
    pol.set_theta(theta)
    expected = bin_values("uniform", 4, (), BOX.low, BOX.high)[[0, 1], [2, 0]]
    assert np.array_equal(pol.act(np.ones(3, np.float32)), expected)
    out = pol(torch.ones(1, 3))
    assert out.shape == (1, 8)


@pytest.fixture(scope="module")
def binned_runs(tmp_path_factory):
    """The quickstart with OpenAI's Humanoid settings and uniform bins at 1, 2 and 3 ranks."""
    root = tmp_path_factory.mktemp("bins")
    for n in (1, 2, 3):
        run_job(n, root / f"n{n}", *TINY, "policy.action_bins=uniform:5", "policy.init=normc",
                "policy.action_noise_std=0.1", "env.obs_clip=5.0", "es.env_seeds=per_episode",
                "es.fitness_shaping=centered_ranks", timeout=120)
    return root




@pytest.mark.mpi
@pytest.mark.timeout(300)
def test_binned_theta_is_rank_invariant(binned_runs):
    theta1, rows1 = final_theta_and_rows(binned_runs / "n1")
    assert theta1.size == 4 * 32 + 32 + 32 * 32 + 32 + 32 * 5 + 5  # 1 action x 5 bins
    for n in (2, 3):
        theta, rows = final_theta_and_rows(binned_runs / f"n{n}")
        assert np.array_equal(theta.view(np.uint32), theta1.view(np.uint32)), f"{n} ranks"
        for key, values in rows1.items():
            assert np.array_equal(rows[key], values), (n, key)
    assert len(np.unique(rows1["fitness_mean"])) > 1  # the episodes really differ


@pytest.mark.mpi
@pytest.mark.timeout(300)
def test_evaluate_and_collect_act_with_the_bins(binned_runs):
    from es_mpi.collect import es_mpi_teacher, record_episode
    from es_mpi.evaluate import Evaluator, parse_table, read_checkpoint

    ckpt = binned_runs / "n2" / "checkpoints" / "ckpt_000003.h5"
    ev = Evaluator(read_checkpoint(ckpt))
    assert isinstance(ev.policy.head, BinnedActionHead)
    proc = subprocess.run([sys.executable, "-m", "es_mpi.evaluate", str(ckpt), "--episodes", "2",
                           "--seed", "7"], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"with {ev.policy.num_params:,} parameters" in proc.stdout
    mean = parse_table(proc.stdout)[-1]["return mean"]
    assert mean == pytest.approx(ev.run(2, 7).returns.mean(), abs=0.005)
    teacher = es_mpi_teacher(type("Args", (), {"teacher": str(ckpt)})())
    episode = record_episode(teacher, env_seed=3, own_seed=4, max_steps=50)
    values = set(bin_values("uniform", 5, (), np.float32([-3]), np.float32([3]))[0].tolist())
    assert set(episode.actions.reshape(-1).tolist()) <= values  # only bin values are played


def test_documented_binned_size_is_the_models():
    """docs/fidelity.md's Humanoid count with uniform:5 bins is the model's own."""
    from es_mpi.envs import make_env
    from es_mpi.policies import make_policy

    cfg = load_job(REPO / "jobs/humanoid_openai.yaml", ["policy.action_bins=uniform:5"])
    env = make_env(cfg.env)
    policy = make_policy(cfg.policy, env.observation_space, env.action_space, 0)
    env.close()
    assert isinstance(policy.head, BinnedActionHead) and policy.head.size == 17 * 5
    docs = (REPO / "docs" / "fidelity.md").read_text()
    assert f"`uniform:5` has {policy.num_params:,}" in docs


def test_pretrain_refuses_a_binned_policy_before_reading_data(tmp_path, capsys):
    from es_mpi.pretrain import main

    code = main([str(REPO / "jobs/quickstart.yaml"), "policy.action_bins=uniform:3",
                 "--data", str(tmp_path / "absent"), "--steps", "1",
                 "--out", str(tmp_path / "p.h5"), "--threads", "1"])
    assert code == 2
    assert "policy.action_bins=uniform:3: pretraining a binned policy" in capsys.readouterr().err
    assert not (tmp_path / "p.h5").exists()


def test_init_from_refuses_other_bins_of_the_same_shape():
    """uniform:3 and custom:-1,0,1 have the same theta length but play other actions."""
    from es_mpi.config import flatten
    from es_mpi.init_from import MUST_MATCH, setting_differences

    job = REPO / "jobs/quickstart.yaml"
    saved = flatten(load_job(job, ["policy.action_bins=uniform:3"]).to_dict())
    now = load_job(job, ["policy.action_bins='custom:-1,0.5,1'"])
    diffs = setting_differences(saved, now, "the file", MUST_MATCH)
    assert diffs == ["policy.action_bins: 'uniform:3' in the file, 'custom:-1,0.5,1' in the job"]
