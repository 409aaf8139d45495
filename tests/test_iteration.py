"""One iteration in process, on a one-rank communicator: the stages wired as the protocol says."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from es_mpi import comm as mpi
from es_mpi import es
from es_mpi.config import load_job
from es_mpi.iteration import ASSIGNMENTS, plan_iteration, run_iteration
from es_mpi.noise import TRAIN_EPISODE, episode_seed
from es_mpi.results import COLUMNS, TIMING_COLUMNS, IterationRow, ResultsWriter
from es_mpi.rollout import run_episode
from es_mpi.runtime import build_runtime, initial_state

TINY = ["es.population=5", "es.noise_table_size=200000", "es.eval_episodes=2",
        "env.obs_stat_prob=0.5", "run.dir=unused", "es.env_seeds=per_pair"]


def setup(*overrides: str):
    cfg = load_job("jobs/quickstart.yaml", [*TINY, *overrides])
    rt = build_runtime(cfg, mpi.world())
    return cfg, rt, initial_state(rt)


def iterate(cfg, rt, state, n: int) -> tuple:
    rows = []
    for _ in range(n):
        state, row = run_iteration(cfg, mpi.world(), rt, state)
        rows.append(row)
    return state, rows


def test_row_record_has_exactly_the_public_columns(tmp_path):
    names = [f.name for f in dataclasses.fields(IterationRow)]
    assert names == [*COLUMNS, "eval_return_targets", "target_error_mean"]  # then the optional
    cfg, rt, state = setup()
    _, (row,) = iterate(cfg, rt, state, 1)
    writer = ResultsWriter(tmp_path / "results.h5")
    bad = {**row.as_dict(), "fitnes_mean": 1.0}
    del bad["fitness_mean"]
    with pytest.raises(ValueError, match="unknown column.*fitnes_mean.*missing.*fitness_mean"):
        writer.append(bad)
    writer.append(row)
    assert len(writer) == 1
    writer.close()
    rt.free()


@pytest.mark.parametrize("assignment", sorted(ASSIGNMENTS))
def test_iteration_equals_the_protocol_computed_by_hand(assignment):
    """Returns of theta +- sigma eps_j from bare episodes, pair ranks, the gradient and the
    SGD step written out here: run_iteration must give exactly this theta and row."""
    cfg, rt, state = setup(f"run.assignment={assignment}", "es.optimizer=sgd", "es.momentum=0.9")
    state, _ = iterate(cfg, rt, state, 1)  # a second iteration has stats, a cap, momentum
    plan = plan_iteration(cfg, rt, state)
    d, n, sigma = state.theta.size, cfg.es.population, cfg.es.sigma
    returns = np.zeros((n, 2))
    for j in range(n):
        eps = rt.noise.table[plan.draws.offsets[j]: plan.draws.offsets[j] + d]
        for s, sign in enumerate((1.0, -1.0)):
            rt.policy.set_theta(state.theta + np.float32(sign * sigma) * eps)
            returns[j, s] = run_episode(rt.env, rt.policy, plan.draws.env_seeds[j, s], plan.cap,
                                        plan.normalize, bool(plan.draws.record_obs[j, s]),
                                        episode_seed=episode_seed(cfg.run.seed, 1, TRAIN_EPISODE,
                                                                  j, s)).ret
    w = es.fitness_weights(returns[:, 0], returns[:, 1], "pair_ranks")
    g = sum(w[j] * rt.noise.table[o: o + d].astype(np.float64)
            for j, o in enumerate(plan.draws.offsets)) / (2 * n * sigma)
    m = 0.9 * state.opt.m + 0.1 * g
    want = ((state.theta.astype(np.float64) + cfg.es.lr * m) * (1 - cfg.es.weight_decay))
    new, (row,) = iterate(cfg, rt, state, 1)
    assert row.fitness_mean == pytest.approx(returns.mean())
    assert row.episodes == state.episodes + 2 * n and row.iteration == 1
    np.testing.assert_allclose(new.theta, want.astype(np.float32), rtol=1e-5, atol=1e-7)
    rt.free()


def test_static_and_dynamic_assignment_give_the_same_bits():
    out = {}
    for assignment in ASSIGNMENTS:
        cfg, rt, state = setup(f"run.assignment={assignment}")
        state, rows = iterate(cfg, rt, state, 3)
        out[assignment] = state, rows
        rt.free()
    (a, rows_a), (b, rows_b) = out.values()
    assert a.theta.tobytes() == b.theta.tobytes()
    assert a.opt.m.tobytes() == b.opt.m.tobytes()
    assert a.obs_stats.sum.tobytes() == b.obs_stats.sum.tobytes() and a.obs_stats.count > 1
    for ra, rb in zip(rows_a, rows_b):
        for name in COLUMNS:
            if name not in TIMING_COLUMNS:
                assert getattr(ra, name) == getattr(rb, name), name


# Shrunk shipped jobs: MLP with action noise, DT with dropout, Atari DT with sampled actions and
# per-pixel statistics, CNN with VBN. With dynamic assignment a rank runs any episodes in any
# order, so an episode must not depend on what the rank ran before it.
ORDER_JOBS = {
    "humanoid_openai": ["env.max_episode_steps=30"],
    "humanoid_dt": ["env.max_episode_steps=15"],
    "atari_hero": ["env.max_frames=160"],
    "atari_hero_cnn": ["env.max_frames=160", "policy.vbn_batch=8"],
}


@pytest.mark.parametrize("job", sorted(ORDER_JOBS))
def test_an_episode_does_not_depend_on_what_ran_before_it(job):
    from es_mpi.iteration import run_item
    from es_mpi.runtime import prepare_vbn
    from es_mpi.schedule import decode

    cfg = load_job(f"jobs/{job}.yaml", ["es.population=2", "es.noise_table_size=5000000",
                                        "es.eval_episodes=1", "env.obs_stat_prob=1.0",
                                        "run.dir=unused", *ORDER_JOBS[job]])
    rt = build_runtime(cfg, mpi.world())
    state = initial_state(rt)
    prepare_vbn(cfg, mpi.world(), rt, state)
    plan = plan_iteration(cfg, rt, state)
    n_items = cfg.es.eval_episodes + 2 * cfg.es.population

    def run(order):
        out = {}
        for i in order:
            r = run_item(cfg, rt, state, plan, decode(i, cfg.es.eval_episodes))
            out[i] = (r.ret, r.length, None if r.obs_sum is None else r.obs_sum.tobytes())
        return out

    forward = run(range(n_items))
    assert run(reversed(range(n_items))) == forward
    assert run([2, 0, 4, 1, 3]) == forward
    rt.free()
