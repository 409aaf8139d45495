"""The pieces of pretraining: window sampling, the learning-rate schedule, settings, training
through the flat parameter vector, spaces, collection seeds, the inspect legend."""
from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from es_mpi.collect import episode_seeds, exploration
from es_mpi.config import ConfigError, load_job
from es_mpi.demos import applied_action, space_mismatch, space_summary
from es_mpi.policies import make_policy
from es_mpi.pretrain import (FAMILIES, action_loss, family_of, lr_factor, make_optimizer,
                             override_settings, sample_windows)

from mpi_helpers import REPO


def test_windows_follow_the_episodes_and_mask_what_runs_past_the_end():
    starts, lengths = np.array([0, 5, 105]), np.array([5, 100, 3])
    rows, mask = sample_windows(np.random.default_rng(0), (starts, lengths), 4000, 10, False)
    ep = np.searchsorted(starts, rows[:, 0], side="right") - 1
    assert np.all(rows >= starts[ep, None]) and np.all(rows < (starts + lengths)[ep, None])
    assert np.all(np.diff(rows, axis=1)[mask[:, 1:]] == 1)  # consecutive steps while real
    assert np.all(mask[:, 0]) and np.all(mask[:, :-1] >= mask[:, 1:])  # real, then padding
    # the padding repeats the last real row (it sits behind every real token)
    last = mask.sum(1) - 1
    assert np.all(rows[~mask] == np.repeat(rows[np.arange(len(rows)), last], (~mask).sum(1)))
    # starts uniform over all steps: the long episode gets ~100/108 of the windows
    assert abs(np.mean(ep == 1) - 100 / 108) < 0.02
    full, fmask = sample_windows(np.random.default_rng(1), (starts, lengths), 2000, 10, True)
    long_ep = np.searchsorted(starts, full[:, 0], side="right") - 1 == 1
    assert np.all(fmask[long_ep]) and np.all(full[long_ep, -1] < 105)  # moved back to fit


def test_steps_are_drawn_uniformly_from_all_steps():
    rows, mask = sample_windows(np.random.default_rng(0), (np.array([0, 10]), np.array([10, 30])),
                                8000, 1, False)
    assert mask.all()
    assert rows.shape == (8000, 1) and rows.min() >= 0 and rows.max() < 40
    assert abs(np.mean(rows < 10) - 0.25) < 0.02


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    s = FAMILIES["dt_atari"]
    assert lr_factor(0, s) == pytest.approx(1 / 133) and lr_factor(132, s) == 1.0
    assert lr_factor(133 + s.cosine_steps // 2, s) == pytest.approx(0.5, abs=1e-6)
    assert lr_factor(133 + 2 * s.cosine_steps, s) == pytest.approx(0.1)
    gym_dt = FAMILIES["dt"]
    assert lr_factor(9_999, gym_dt) == 1.0 and lr_factor(10**6, gym_dt) == 1.0


def test_settings_overrides_are_typed_and_named():
    s = override_settings(FAMILIES["dt"], ["lr=1e-3", "batch_size=64", "full_windows=true"])
    assert (s.lr, s.batch_size, s.full_windows) == (1e-3, 64, True)
    with pytest.raises(ConfigError, match="unknown setting 'lrr'"):
        override_settings(FAMILIES["dt"], ["lrr=1"])
    with pytest.raises(ConfigError, match="batch_size: expected int"):
        override_settings(FAMILIES["dt"], ["batch_size=many"])


def _policy(job: str, *overrides: str):
    cfg = load_job(REPO / "jobs" / job, list(overrides))
    from es_mpi.envs import make_env
    env = make_env(cfg.env)
    return make_policy(cfg.policy, env.observation_space, env.action_space, 0,
                       obs_normalized=cfg.env.normalize_obs), env


def test_training_writes_through_the_flat_vector_and_gradients_switch_off():
    policy, env = _policy("quickstart_dt.yaml")
    assert family_of(policy) == "dt" and not any(p.requires_grad for p in policy.parameters())
    before = policy.get_theta()
    opt, sched = make_optimizer(policy, override_settings(FAMILIES["dt"], ["warmup_steps=1"]))
    with policy.trainable():
        k = policy.context
        out = policy.model(torch.zeros(2, k), torch.randn(2, k, 4), torch.zeros(2, k, 1),
                           torch.arange(k).repeat(2, 1))
        loss = action_loss(policy, out, np.ones((2, k, 1), np.float32), np.ones((2, k), bool))
        loss.backward()
        opt.step()
    after = policy.get_theta()
    assert not np.array_equal(before, after)  # the optimiser stepped the flat vector itself
    assert not any(p.requires_grad for p in policy.parameters())
    assert policy._packed is None  # per-step caches are rebuilt from the new theta


def test_masked_positions_do_not_count_in_the_loss():
    policy, _ = _policy("quickstart.yaml")
    raw = torch.zeros(1, 3, 1)
    target = np.array([[[0.0], [5.0], [-5.0]]], np.float32)
    assert action_loss(policy, raw, target, np.array([[True, False, False]])).item() == 0.0
    assert action_loss(policy, raw, target, np.array([[True, True, False]])).item() == 12.5


def test_matrices_only_weight_decay_spares_biases_norms_and_position_tables():
    policy, _ = _policy("atari_hero.yaml", "policy.n_layer=1", "policy.max_ep_len=50")
    assert family_of(policy) == "dt_atari"
    opt, _ = make_optimizer(policy, FAMILIES["dt_atari"])
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    named = dict(policy.named_parameters())
    assert id(named["model.transformer.h.0.attn.c_attn.weight"]) in decayed
    assert id(named["model.state_encoder.convs.0.weight"]) in decayed
    for name in ("model.pos_emb", "model.global_pos_emb", "model.embed_action.weight",
                 "model.transformer.ln_f.weight", "model.embed_return.bias"):
        assert id(named[name]) not in decayed, name
    assert len(decayed) + len(opt.param_groups[1]["params"]) == len(named)


def test_spaces_compare_by_shape_and_kind():
    box = gym.spaces.Box(-1, 1, (3,), np.float64)
    assert space_mismatch("x", space_summary(gym.spaces.Box(-2, 2, (3,), np.float32)),
                          space_summary(box)) is None
    msg = space_mismatch("its observation", space_summary(gym.spaces.Box(-1, 1, (4,))),
                         space_summary(box))
    assert "(4,)" in msg and "(3,)" in msg
    assert space_mismatch("a", space_summary(gym.spaces.Discrete(4)),
                          space_summary(gym.spaces.Discrete(18))) is not None
    frames = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
    assert space_mismatch("o", space_summary(frames), space_summary(
        gym.spaces.Box(0, 1, (4, 84, 84), np.float32))) is not None


def test_recorded_actions_are_the_applied_ones():
    box = gym.spaces.Box(-0.4, 0.4, (2,), np.float32)
    assert np.array_equal(applied_action([1.0, -0.1], box), np.array([0.4, -0.1], np.float32))
    assert applied_action(3, gym.spaces.Discrete(5)) == 3


def test_collection_seeds_depend_on_seed_and_index_only():
    seeds = {episode_seeds(0, i) for i in range(100)} | {episode_seeds(1, i) for i in range(100)}
    assert len(seeds) == 200 and episode_seeds(3, 7) == episode_seeds(3, 7)
    rng = lambda: np.random.default_rng(0)  # noqa: E731
    box = gym.spaces.Box(-1, 1, (2,))
    assert np.array_equal(exploration(box, 0.0, rng(), np.zeros(2)), np.zeros(2))
    assert not np.array_equal(exploration(box, 0.1, rng(), np.zeros(2)), np.zeros(2))
    picks = [exploration(gym.spaces.Discrete(6), 0.5, np.random.default_rng(i), 0)
             for i in range(200)]
    assert 0.3 < np.mean(np.array(picks) != 0) < 0.6  # epsilon 0.5, 5 of 6 random picks differ


def test_inspect_legend_names_scratch_and_pretrained_runs():
    from pathlib import Path

    from es_mpi.inspect import Run, group_runs

    base = {"env.id": "Humanoid-v4", "es.lr": 0.05, "run.init_from": None}
    runs = [Run(Path(f"r{i}/results.h5"), {}, {**base, **cfg}) for i, cfg in enumerate(
        [{}, {"es.lr": 0.01, "run.init_from": "pretrained/humanoid_dt.h5"}])]
    labels = sorted(group_runs(runs))
    assert labels == ["from humanoid_dt.h5, es.lr=0.01 (1)", "from scratch, es.lr=0.05 (1)"]
    # a run written before run.init_from existed has no such key: from scratch too
    older = Run(Path("r2/results.h5"), {}, {"env.id": "Humanoid-v4", "es.lr": 0.02})
    assert "from scratch, es.lr=0.02 (1)" in group_runs([*runs, older])


@pytest.mark.parametrize("option, value", [
    ("steps", 0), ("eval_every", -5), ("eval_episodes", -1), ("threads", 0),
    ("heldout_batches", -1), ("eval_max_steps", 0), ("heldout_fraction", 1.0),
    ("heldout_fraction", -0.1)])
def test_pretrain_names_an_option_out_of_range(option, value, tmp_path):
    """Before any training (a negative --eval-every used to loop for ever)."""
    from es_mpi.pretrain import check_args, parse_args

    args = parse_args(["jobs/quickstart_dt.yaml", "--data", "d", "--steps", "100",
                       "--out", str(tmp_path / "dt.h5")])
    check_args(args)
    setattr(args, option, value)
    with pytest.raises(ConfigError, match="--" + option.replace("_", "-")):
        check_args(args)


def test_pretrain_refuses_a_folder_as_out(tmp_path):
    from es_mpi.pretrain import check_args, parse_args

    args = parse_args(["jobs/quickstart_dt.yaml", "--data", "d", "--steps", "10", "--out",
                       str(tmp_path)])
    with pytest.raises(ConfigError, match="--out"):
        check_args(args)


def test_frame_statistics_are_exact_in_chunks():
    """Integer frames are summed in chunks of rows (memory): the same int64 sums."""
    from types import SimpleNamespace

    from es_mpi.pretrain import STATS_ROWS, dataset_stats

    obs = np.random.default_rng(0).integers(0, 256, (2 * STATS_ROWS + 7, 4, 6, 6), np.uint8)
    stats = dataset_stats(SimpleNamespace(observations=obs, steps=len(obs)), True)
    empty = dataset_stats(SimpleNamespace(observations=obs[:1], steps=1), False)
    assert np.array_equal(stats.sum - empty.sum, obs.sum(axis=0, dtype=np.int64))
    assert np.array_equal(stats.sumsq - empty.sumsq,
                          np.square(obs, dtype=np.int64).sum(axis=0))


def test_a_dataset_from_another_env_setting_is_a_warning_naming_it(capsys):
    from types import SimpleNamespace

    from es_mpi.envs import make_env
    from es_mpi.pretrain import check_dataset

    cfg = load_job(REPO / "jobs/quickstart_dt.yaml", [])
    env = make_env(cfg.env)
    meta = {"id": "InvertedPendulum-v4", "normalize_obs": cfg.env.normalize_obs, "unrelated_key": 1}
    demos = SimpleNamespace(observation_space=env.observation_space, source="d",
                            action_space=env.action_space, es_mpi_meta=lambda key: meta)
    check_dataset(demos, env, cfg)
    err = capsys.readouterr().err
    assert f"env.id: 'InvertedPendulum-v4' in the dataset, {cfg.env.id!r} in the job" in err
    assert "normalize_obs" not in err and "unrelated_key" not in err
