"""Lorenc & Neruda's Atari pipeline as their code ran it: the uint8 (wrapped) squares of the
observation statistics, the frame pooling order, and the pretraining recipe's pieces."""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch

from es_mpi.checkpoint import load_checkpoint
from es_mpi.config import ConfigError, load_job
from es_mpi.demos import Demos
from es_mpi.envs import make_env
from es_mpi.envs_atari import AreaResize, max_then_resize, resize_then_max
from es_mpi.es import ObsStats
from es_mpi.policies import make_policy
from es_mpi.pretrain import (FAMILIES, Corpus, dropout_rate, epoch_windows, forward,
                             full_windows, recipe_settings, zero_terminal_rewards)
from es_mpi.rollout import make_normalizer, obs_squares

from mpi_helpers import REPO, run_job


# ----------------------------------------------------------------------------- wrapped squares
def test_uint8_squares_wrap_modulo_256_and_put_the_std_at_the_floor():
    frames = np.array([[16, 17], [15, 200]], dtype=np.uint8)  # two observations of 2 pixels
    wrapped = sum(obs_squares(f, np.int64, "uint8_wrap") for f in frames)
    exact = sum(obs_squares(f, np.int64, "exact") for f in frames)
    # 16^2 = 256 -> 0, 15^2 = 225; 17^2 = 289 -> 33, 200^2 = 40000 -> 64
    assert wrapped.tolist() == [0 + 225, 33 + 64] and exact.tolist() == [481, 40289]
    stats = ObsStats.empty((2,))  # pseudo-count 0.01 at mean 0, variance 1
    stats.add(frames.sum(0).astype(np.float64), wrapped.astype(np.float64), 2.0)
    # pixel 0: mean 31 / 2.01 = 15.42, E[sq] = 225.01 / 2.01 = 111.9 < mean^2 = 237.9 -> floor
    assert stats.std(0.01) == pytest.approx([0.1, 0.1])
    true = ObsStats.empty((2,))
    true.add(frames.sum(0).astype(np.float64), exact.astype(np.float64), 2.0)
    assert true.std(0.01)[0] == pytest.approx(np.sqrt(481.01 / 2.01 - (31 / 2.01) ** 2))


def test_uint8_squares_equal_the_authors_batch_formula_on_hero_frames():
    """Their es/funcs.py: np.square(np.array(states)).sum(axis=0) of the uint8 stacks."""
    env = make_env(load_job(REPO / "jobs/atari_hero.yaml").env)
    obs, _ = env.reset(seed=3)
    seen, ours = [], np.zeros(obs.shape, np.int64)
    for t in range(30):
        seen.append(obs)
        ours += obs_squares(obs, np.int64, "uint8_wrap")
        obs, *_ = env.step(t % env.action_space.n)
    theirs = np.square(np.array(seen)).sum(axis=0)
    assert np.array_equal(ours, theirs.astype(np.int64)) and ours.max() < 256 * 30
    with pytest.raises(ValueError, match="uint8"):
        obs_squares(np.ones(3, np.float32), np.float64, "uint8_wrap")


def test_uint8_squares_need_an_atari_env():
    with pytest.raises(ConfigError, match="env.obs_squares"):
        load_job(REPO / "jobs/quickstart.yaml", ["env.obs_squares=uint8_wrap"])


# ----------------------------------------------------------------------------- pooling order
def test_pool_orders_on_a_hand_computed_pair():
    resize = AreaResize((4, 4), 2)  # each output pixel averages a 2x2 block
    a, b = np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8)
    a[0, 0], b[0, 1] = 200, 100  # one block: {200, 0, 0, 0} and {0, 100, 0, 0}
    # max first: {200, 100, 0, 0} -> 75; resize first: max(50, 25) = 50
    assert max_then_resize(a, b, resize)[0, 0] == 75
    assert resize_then_max(a, b, resize)[0, 0] == 50
    assert np.array_equal(resize_then_max(a, b, resize), np.maximum(resize(a), resize(b)))


def test_hero_steps_pool_in_the_configured_order():
    differ = 0
    for order, pool in (("resize_then_max", resize_then_max),
                        ("max_then_resize", max_then_resize)):
        env = make_env(load_job(REPO / "jobs/atari_hero.yaml", [f"env.pool_order={order}"]).env)
        env.reset(seed=0)
        for t in range(24):
            obs, *_ = env.step(t % env.action_space.n)
            a, b = env.screens  # the step's last two screens
            assert np.array_equal(obs[-1], pool(a, b, env.resize)), (order, t)
            differ += not np.array_equal(obs[-1], (resize_then_max if pool is max_then_resize
                                                   else max_then_resize)(a, b, env.resize))
    assert differ > 0  # the orders give other frames on Hero


# ----------------------------------------------------------------------------- pretraining
def test_every_full_window_once_and_short_episodes_whole():
    first, n = full_windows((np.array([0, 5, 105]), np.array([5, 100, 3])), 10)
    assert first.tolist() == [0, *range(5, 96), 105] and n.tolist() == [5] + [10] * 91 + [3]
    gen = epoch_windows(0, (np.array([0, 5, 105]),
                                                   np.array([5, 100, 3])), 31, 10)
    rows = np.concatenate([next(gen)[0] for _ in range(3)])  # 93 windows: one epoch
    got = sorted(rows[:93, 0].tolist())
    assert got == sorted([0, *range(5, 96), 105]) and len(set(rows[:31, 0])) == 31
    rows, mask = next(gen)
    short = rows[rows[:, 0] == 105]
    assert np.all(short[:, :3] == [105, 106, 107]) and np.all(short[:, 3:] == 107)


def test_epoch_windows_resume_at_any_batch():
    """Batch i depends on (seed, i) alone: a pretraining resumed at batch 5 draws what an
    uninterrupted one draws from its 6th batch on (epochs of 93 windows, batches of 40)."""
    episodes = (np.array([0, 5, 105]), np.array([5, 100, 3]))
    whole = epoch_windows(3, episodes, 40, 10)
    ref = [next(whole) for _ in range(9)]
    resumed = epoch_windows(3, episodes, 40, 10, first_batch=5)
    for rows, mask in ref[5:]:
        again = next(resumed)
        assert np.array_equal(again[0], rows) and np.array_equal(again[1], mask)
    assert not np.array_equal(ref[0][0], next(epoch_windows(4, episodes, 40, 10))[0])


def test_terminal_reward_zeroed_only_for_terminated_episodes():
    demos = Demos(np.zeros((5, 1)), np.zeros((5, 1)), np.array([1., 2., 3., 4., 5.]),
                  np.array([0, 3]), np.array([3, 2]), None, None, "x", {},
                  np.array([True, False]))
    assert zero_terminal_rewards(demos).tolist() == [1, 2, 0, 4, 5]
    with pytest.raises(ConfigError, match="terminated"):
        zero_terminal_rewards(Demos(*[getattr(demos, k) for k in (
            "observations", "actions", "rewards", "starts", "lengths", "observation_space",
            "action_space", "source")]))


def test_authors_recipe_and_cloning_dropout():
    s = recipe_settings("dt_atari", "authors", [])
    assert (s.windows, s.dropout, s.input_divisor) == ("epochs", 0.1, 255.0)
    assert recipe_settings("dt", "authors", ["dropout=null"]).terminal_reward == "zero"
    assert recipe_settings("dt", "es_mpi", []) == FAMILIES["dt"]
    with pytest.raises(ConfigError, match="Decision Transformers"):
        recipe_settings("feedforward", "authors", [])
    with pytest.raises(ConfigError, match="windows: must be one of"):
        recipe_settings("dt", "es_mpi", ["windows=all"])
    cfg = load_job(REPO / "jobs/quickstart_dt.yaml")
    env = make_env(cfg.env)
    policy = make_policy(cfg.policy, env.observation_space, env.action_space, 0)
    before = [m.p for m in policy.modules() if hasattr(m, "p")]
    with dropout_rate(policy, 0.3):
        assert {m.p for m in policy.modules() if hasattr(m, "p")} == {0.3}
    assert [m.p for m in policy.modules() if hasattr(m, "p")] == before


# ----------------------------------------------------------------------------- under MPI
@pytest.mark.mpi
def test_hero_with_the_authors_statistics_and_pooling_bitwise_at_1_and_3_ranks(tmp_path):
    """jobs/atari_hero.yaml (uint8_wrap squares, resize_then_max) shrunk so that episodes
    score; tests/test_atari_mpi.py compares 1 and 2 ranks of the same job."""
    tiny = ("es.population=3", "run.iterations=2", "env.max_frames=400",
            "es.noise_table_size=5000000", "es.eval_episodes=1", "run.checkpoint_every=1",
            "env.obs_stat_prob=0.5")
    finals = {}
    for n in (1, 3):
        proc = run_job(n, tmp_path / f"n{n}", *tiny, job="jobs/atari_hero.yaml", timeout=240)
        assert re.search(r"fitness mean +[1-9]", proc.stdout), "no episode scored"
        finals[n], _ = load_checkpoint(tmp_path / f"n{n}" / "checkpoints" / "ckpt_000002.h5")
    assert np.array_equal(finals[1].theta.view(np.uint32), finals[3].theta.view(np.uint32))
    stats = finals[3].obs_stats
    assert np.array_equal(stats.sumsq, finals[1].obs_stats.sumsq) and stats.count > 100
    assert stats.sumsq.max() < 256 * stats.count  # wrapped squares: each below 256
    assert np.mean(stats.std(0.01) == 0.1) > 0.99  # the authors' std: the floor


def test_hero_cloning_inputs_are_the_frames_divided_by_255():
    """input_divisor acts on the cloning inputs after the statistics (the authors' state / 255);
    the same forward as a corpus whose frames were divided beforehand."""
    cfg = load_job(REPO / "jobs/atari_hero.yaml",
                   ["policy.n_layer=1", "policy.context=4", "policy.max_ep_len=50"])
    env = make_env(cfg.env)
    policy = make_policy(cfg.policy, env.observation_space, env.action_space, 0,
                         obs_normalized=True)
    frames = np.random.default_rng(0).integers(0, 256, (8, 4, 84, 84), dtype=np.uint8)
    ident = ObsStats.empty((4, 84, 84))  # mean 0, std 1: the raw frames as float32
    corpus = Corpus(frames, np.arange(8) % 18, np.zeros(8, np.float32), np.arange(8),
                    (np.array([0]), np.array([8])), (np.zeros(0, int), np.zeros(0, int)),
                    make_normalizer(cfg.env, ident))
    rows = np.arange(8).reshape(2, 4)
    settings = recipe_settings("dt_atari", "authors", ["dropout=null"])
    scaled = dataclasses.replace(corpus, normalize=lambda x: x.astype(np.float32) / 255)
    with torch.no_grad():
        got = forward(policy, corpus, rows, settings, True, None)
        want = forward(policy, scaled, rows, dataclasses.replace(settings, input_divisor=1.0),
                       True, None)
        raw = forward(policy, corpus, rows, dataclasses.replace(settings, input_divisor=1.0),
                      True, None)
    assert torch.equal(got, want) and not torch.allclose(got, raw)
