"""Every stochastic option of the paper jobs keeps theta bitwise equal at 1, 2 and 3 ranks:
action noise (OpenAI), dropout and sampled actions (Lorenc's DTs), each episode's own reset
seed (OpenAI) and the population-wide one (Lorenc)."""
import numpy as np
import pytest

from mpi_helpers import TINY, final_theta_and_rows, run_job

pytestmark = pytest.mark.mpi

CASES = {
    # OpenAI's Humanoid policy on the quickstart task: linear output, normc, action noise,
    # observations clipped to ±5, one reset seed per episode
    "action_noise": ("policy.action_mapping=linear", "policy.init=normc",
                     "policy.action_noise_std=0.1", "env.obs_clip=5.0",
                     "es.env_seeds=per_episode", "es.fitness_shaping=centered_ranks"),
    # a small Decision Transformer with dropout, sampling discrete actions (CartPole)
    "dropout_and_sampling": ("env.id=CartPole-v1", "policy.kind=dt", "policy.context=4",
                             "policy.n_embd=16", "policy.n_layer=1", "policy.n_head=1",
                             "policy.max_ep_len=500", "policy.dropout=0.1",
                             "policy.discrete_action=sample", "policy.rtg_scale=0.01",
                             "policy.target_return=500", "es.env_seeds=per_iteration"),
}




@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", sorted(CASES))
def test_stochastic_options_keep_theta_rank_invariant(tmp_path, case):
    finals = {}
    for n in (1, 2, 3):
        run_job(n, tmp_path / f"n{n}", *TINY, *CASES[case], timeout=120)
        finals[n] = final_theta_and_rows(tmp_path / f"n{n}")
    theta1, rows1 = finals[1]
    for n in (2, 3):
        theta, rows = finals[n]
        assert np.array_equal(theta.view(np.uint32), theta1.view(np.uint32)), f"{n} ranks"
        for key, values in rows1.items():
            assert np.array_equal(rows[key], values), (n, key)
    assert len(np.unique(rows1["fitness_mean"])) > 1  # the episodes really differ
