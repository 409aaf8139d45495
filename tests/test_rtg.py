"""Return-conditioned ES (es.fitness: target_return) without MPI: the fitness, the target draws,
the iteration in process, the optional results columns and their documentation."""
from __future__ import annotations

import dataclasses
import typing

import h5py
import numpy as np
import pytest

from _mpirun_persist import check_doc_agrees
from es_mpi import comm as mpi
from es_mpi import es, inspect, iteration, noise, rollout
from es_mpi.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from es_mpi.config import ConfigError, ESConfig, load_job
from es_mpi.iteration import plan_iteration, run_iteration
from es_mpi.noise import TRAIN_EPISODE, TargetSpec, episode_seed, iteration_draws, pair_targets
from es_mpi.results import COLUMNS, ResultsWriter, Schema, check_rows, read_results
from es_mpi.runtime import build_runtime, initial_state

JOB = "jobs/pendulum_dt_rtg.yaml"
TINY = ["es.population=4", "es.noise_table_size=100000", "env.max_episode_steps=25",
        "es.eval_episodes=1", "es.eval_targets=[5, 20]", "es.target_range=[5, 25]",
        "run.dir=unused"]


# ----------------------------------------------------------------------------- fitness
def test_target_fitness_is_minus_the_distance_to_the_pairs_target():
    returns = np.array([[10.0, 30.0], [50.0, 45.0], [0.0, 0.0]])
    targets = np.array([20.0, 50.0, 7.0])
    np.testing.assert_array_equal(es.episode_fitness(returns, targets, "return"), returns)
    fit = es.episode_fitness(returns, targets, "target_return")
    np.testing.assert_array_equal(fit, [[-10, -10], [0, -5], [-7, -7]])
    # w R: an undershoot costs 1 + w per unit, an overshoot 1 - w; the best return is R*_j
    fit_w = es.episode_fitness(returns, targets, "target_return", 0.25)
    np.testing.assert_array_equal(fit_w, fit + 0.25 * returns)
    grid = np.linspace(0, 100, 201)[:, None]
    best = grid[np.argmax(es.episode_fitness(np.hstack([grid, grid]), np.full(201, 60.0),
                                             "target_return", 0.5)[:, 0])]
    assert best == 60.0
    with pytest.raises(ValueError, match="targets"):
        es.episode_fitness(returns, None, "target_return")
    with pytest.raises(ValueError, match="unknown fitness"):
        es.episode_fitness(returns, targets, "nope")
    # shaping ranks the fitness: the episode nearer its target gets the positive weight
    w = es.fitness_weights(fit[:, 0], fit[:, 1], "pair_ranks")
    assert w[1] > w[0] == w[2]  # pairs 0 and 2: equally far on both signs


# ----------------------------------------------------------------------------- target draws
def test_targets_are_a_function_of_seed_iteration_and_pair_only():
    uni = TargetSpec("uniform", (10.0, 100.0))
    a = pair_targets(3, 7, 50, uni)
    assert a.shape == (50,) and a.dtype == np.float64 and np.all((a >= 10) & (a < 100))
    np.testing.assert_array_equal(pair_targets(3, 7, 50, uni), a)  # no hidden state
    np.testing.assert_array_equal(pair_targets(3, 7, 20, uni), a[:20])  # j-th never depends on N
    assert not np.array_equal(pair_targets(4, 7, 50, uni), a)  # another run seed
    assert not np.array_equal(pair_targets(3, 8, 50, uni), a)  # another iteration
    listed = pair_targets(3, 7, 400, TargetSpec("list", values=(0.0, 500.0, 1000.0)))
    assert set(listed) == {0.0, 500.0, 1000.0}
    hints = typing.get_type_hints(ESConfig)
    assert sorted(noise.TARGET_DRAWS) == sorted(typing.get_args(hints["target_draw"]))
    assert sorted(es.FITNESS) == sorted(typing.get_args(hints["fitness"]))


def test_targets_leave_every_other_draw_unchanged():
    """Turning the mode on adds targets; offsets, seeds and obs selections stay the same bits,
    so the theta of every existing job is unchanged."""
    args = (5, 2, 30, 10_000, 100, 0.3, 3, "per_pair")
    plain = iteration_draws(*args)
    with_targets = iteration_draws(*args, TargetSpec("uniform", (0.0, 1.0)))
    assert plain.targets is None and with_targets.targets.shape == (30,)
    for f in ("offsets", "env_seeds", "record_obs", "eval_seeds"):
        assert getattr(plain, f).tobytes() == getattr(with_targets, f).tobytes(), f


def test_config_names_the_keys():
    load_job(JOB, TINY)
    with pytest.raises(ConfigError, match=r"es.fitness=target_return.*policy.kind dt.*'mlp'"):
        load_job("jobs/quickstart.yaml", ["es.fitness=target_return", "es.target_range=[0, 1]"])
    with pytest.raises(ConfigError, match=r"es.eval_targets=\[1\].*policy.kind"):
        load_job("jobs/quickstart.yaml", ["es.eval_targets=[1]"])
    with pytest.raises(ConfigError, match="es.target_range: es.fitness target_return"):
        load_job(JOB, ["es.target_range=[]"])
    with pytest.raises(ConfigError, match="es.target_values"):
        load_job(JOB, ["es.target_draw=list"])
    with pytest.raises(ConfigError, match=r"es.target_range: must be \[low, high\]"):
        load_job(JOB, ["es.target_range=[5, 5]"])
    with pytest.raises(ConfigError, match="es.target_return_weight"):
        load_job(JOB, ["es.target_return_weight=1.0"])


# ----------------------------------------------------------------------------- the iteration
@pytest.fixture
def runtime():
    made = []

    def make(*overrides):
        cfg = load_job(JOB, [*TINY, *overrides])
        rt = build_runtime(cfg, mpi.world())
        made.append(rt)
        return cfg, rt, initial_state(rt)

    yield make
    for rt in made:
        rt.free()


def test_both_signs_start_at_the_pairs_target_and_evaluations_at_theirs(runtime, monkeypatch):
    cfg, rt, state = runtime("policy.target_return=99")
    seen = {}
    real = rollout.run_episode

    def spy(env, policy, seed, *args, target_return=None, **kw):
        seen.setdefault(target_return, []).append(int(seed))
        return real(env, policy, seed, *args, target_return=target_return, **kw)

    monkeypatch.setattr(rollout, "run_episode", spy)
    _, row = run_iteration(cfg, mpi.world(), rt, state)
    targets = plan_iteration(cfg, rt, state).draws.targets
    for j, t in enumerate(targets):
        assert len(seen[float(t)]) == 2  # (j, +) and (j, -)
    eval_seed = int(plan_iteration(cfg, rt, state).draws.eval_seeds[0])
    assert seen[None] == seen[5.0] == seen[20.0] == [eval_seed]  # slots share their seeds
    assert len(row.eval_return_targets) == 2 and row.target_error_mean >= 0


def test_update_ranks_the_distance_to_the_targets(runtime):
    """theta after one iteration equals -|R - R*_j| ranked and summed here by hand."""
    cfg, rt, state = runtime("es.env_seeds=per_pair", "es.target_range=[0, 12]")
    plan = plan_iteration(cfg, rt, state)
    d, n, sigma = state.theta.size, cfg.es.population, cfg.es.sigma
    returns = np.zeros((n, 2))
    for j in range(n):
        eps = rt.noise.table[plan.draws.offsets[j]: plan.draws.offsets[j] + d]
        for s, sign in enumerate((1.0, -1.0)):
            rt.policy.set_perturbed(state.theta, eps, sign * sigma)
            returns[j, s] = rollout.run_episode(
                rt.env, rt.policy, plan.draws.env_seeds[j, s], plan.cap, plan.normalize,
                bool(plan.draws.record_obs[j, s]), target_return=plan.draws.targets[j],
                episode_seed=episode_seed(cfg.run.seed, 0, TRAIN_EPISODE, j, s)).ret
    fit = -np.abs(returns - plan.draws.targets[:, None])
    w = es.fitness_weights(fit[:, 0], fit[:, 1], "pair_ranks")
    plain = es.fitness_weights(returns[:, 0], returns[:, 1], "pair_ranks")
    assert not np.array_equal(w, plain), "the test would not see the plain return used instead"
    g = sum(w[j] * rt.noise.table[o: o + d].astype(np.float64)
            for j, o in enumerate(plan.draws.offsets)) / (2 * n * sigma)
    step, _ = es.adam_step(g, state.opt, cfg.es.lr)
    new, row = run_iteration(cfg, mpi.world(), rt, state)
    np.testing.assert_allclose(new.theta, state.theta + step.astype(np.float32), rtol=1e-5,
                               atol=1e-7)
    assert row.target_error_mean == pytest.approx(np.abs(returns - plan.draws.targets[:, None])
                                                  .mean())


def test_an_eval_target_equal_to_the_policys_own_gives_the_same_return(runtime):
    """Common random numbers across evaluation slots: only the return-to-go differs."""
    cfg, rt, state = runtime("policy.target_return=20", "es.eval_episodes=2")
    _, row = run_iteration(cfg, mpi.world(), rt, state)
    assert row.eval_return_targets[1] == row.eval_return
    assert iteration.n_eval_items(cfg) == 6


# ----------------------------------------------------------------------------- results files
def target_rows(n: int, k: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(n)
    rows = {name: rng.random(n).astype(dtype) for name, (dtype, _, _) in COLUMNS.items()}
    rows["iteration"] = np.arange(n)
    rows["target_error_mean"] = rng.random(n)
    rows.update({f"eval_return_target_{i}": rng.random(n) * 100 for i in range(k)})
    return rows


def test_results_and_checkpoints_carry_the_target_columns(tmp_path):
    cfg = load_job(JOB, TINY)
    schema = Schema.of_config(cfg)
    assert list(schema.optional()) == ["target_error_mean", "eval_return_target_0",
                                       "eval_return_target_1"]
    rows = target_rows(3)
    path = tmp_path / "results.h5"
    ResultsWriter(path, keep_rows=3, config_text=cfg.to_yaml(), rows=rows, schema=schema).close()
    with h5py.File(path, "r") as f:
        assert [f[f"iterations/eval_return_target_{i}"].attrs["target"] for i in (0, 1)] == [5, 20]
    got = read_results(path)
    assert all(got[k].tobytes() == np.asarray(v).tobytes() for k, v in check_rows(rows, 3).items())
    check_doc_agrees(path, "results.h5")
    state = dataclasses.replace(initial_state_like(), iteration=3, results=rows)
    save_checkpoint(checkpoint_path(tmp_path, 3), state, cfg.to_yaml(),
                    {"scheme": "x", "run_seed": 0, "noise_seed": 1, "noise_table_size": 9})
    check_doc_agrees(checkpoint_path(tmp_path, 3), "Checkpoint")
    loaded, _ = load_checkpoint(checkpoint_path(tmp_path, 3))
    assert sorted(loaded.results) == sorted(check_rows(rows, 3))
    # a writer for these columns refuses a row without them
    w = ResultsWriter(tmp_path / "r2.h5", schema=schema)
    with pytest.raises(ValueError, match="missing column.*eval_return_target_0"):
        w.append({name: rows[name][0] for name in COLUMNS})
    w.close()


def initial_state_like():
    from es_mpi.checkpoint import TrainState
    from es_mpi.es import ObsStats, OptimizerState

    return TrainState(0, np.zeros(4, np.float32), OptimizerState.zeros(4), ObsStats.empty((2,)),
                      np.zeros(0, np.int64))


def test_inspect_plots_achieved_against_target(tmp_path, capsys):
    cfg = load_job(JOB, TINY)
    run = tmp_path / "run"
    run.mkdir()
    rows = target_rows(8)
    rows["eval_return_target_0"][-5:] = [4, 5, 6, 5, 5]
    ResultsWriter(run / "results.h5", keep_rows=8, config_text=cfg.to_yaml(), rows=rows,
                  schema=Schema.of_config(cfg)).close()
    (loaded,) = inspect.load_runs([str(run)])
    targets, achieved = inspect.achieved_vs_target(loaded)
    np.testing.assert_array_equal(targets, [5, 20])
    assert achieved[0] == 5.0 and achieved[1] == rows["eval_return_target_1"][-5:].mean()
    png = tmp_path / "fig.png"
    assert inspect.main([str(run), "--plot", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 20_000
