"""The paper jobs run their references' settings (docs/fidelity.md), and the documented model
sizes are the models' own counts."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from es_mpi import noise
from es_mpi.config import flatten, load_job
from es_mpi.envs import make_env
from es_mpi.policies import make_policy

REPO = Path(__file__).resolve().parents[1]

LORENC_ES = {
    "es.sigma": 0.02, "es.optimizer": "sgd", "es.momentum": 0.9, "es.lr": 0.05,
    "es.fitness_shaping": "pair_ranks", "es.grad_divisor": "episodes",
    "es.divide_by_sigma": True, "es.weight_decay": 0.005, "es.weight_decay_mode": "decoupled",
    "es.episode_cap_factor": 2.0, "es.env_seeds": "per_iteration", "es.tie_break": "average",
    "env.obs_stat_prob": 0.01, "env.obs_var_floor": 0.01, "env.obs_clip": None,
    "env.normalize_obs": True, "env.obs_squares": "exact",
}
LORENC_HERO = {
    **LORENC_ES, "es.population": 40000, "run.iterations": 60, "env.noop_max": 0,
    "env.repeat_action_probability": 0.0, "env.frame_skip": 4, "env.max_pool_frames": True,
    "env.frame_stack": 4, "env.frame_stack_reset": "zeros", "env.max_frames": 108000,
    "env.pool_order": "resize_then_max", "env.obs_squares": "uint8_wrap",
    "env.clip_rewards": False, "env.terminal_on_life_loss": False, "policy.kind": "dt",
    "policy.context": 30, "policy.n_layer": 6, "policy.n_head": 8, "policy.n_embd": 128,
    "policy.max_ep_len": 10000, "policy.rtg_scale": 1.0, "policy.discrete_action": "sample",
    "policy.dropout": 0.0, "policy.embed_init": "torch", "policy.frame_scale": 1.0,
    "policy.vbn": False, "policy.scaled_residual_init": False,
}
REFERENCES = {
    "humanoid_mlp": {**LORENC_ES, "es.population": 5000, "run.iterations": 200,
                     "env.id": "Humanoid-v4", "policy.kind": "mlp", "policy.hidden": [256, 256],
                     "policy.activation": "tanh", "policy.action_mapping": "tanh",
                     "policy.init": "torch", "policy.action_noise_std": 0.0,
                     "policy.action_bins": "continuous"},
    "humanoid_dt": {**LORENC_ES, "es.population": 20000, "run.iterations": 200,
                    "env.id": "Humanoid-v4", "policy.kind": "dt", "policy.context": 20,
                    "policy.n_embd": 128, "policy.n_layer": 3, "policy.n_head": 1,
                    "policy.max_ep_len": 1000, "policy.rtg_scale": 0.001,
                    "policy.action_mapping": "tanh", "policy.dropout": 0.1,
                    "policy.scaled_residual_init": False},
    "humanoid_dt_half_population": {
        **LORENC_ES, "es.population": 10000, "run.iterations": 200, "env.id": "Humanoid-v4",
        "policy.kind": "dt", "policy.context": 20, "policy.n_embd": 128, "policy.n_layer": 3,
        "policy.n_head": 1, "policy.max_ep_len": 1000, "policy.rtg_scale": 0.001,
        "policy.action_mapping": "tanh", "policy.dropout": 0.1,
        "policy.scaled_residual_init": False},
    "atari_hero": LORENC_HERO,
    "atari_hero_no_norm": {**LORENC_HERO, "env.normalize_obs": False},
    "humanoid_openai": {
        "es.population": 5000, "es.sigma": 0.02, "es.optimizer": "adam", "es.lr": 0.01,
        "es.fitness_shaping": "centered_ranks", "es.grad_divisor": "episodes",
        "es.divide_by_sigma": False, "es.weight_decay": 0.005, "es.weight_decay_mode": "l2",
        "es.episode_cap_factor": 0.0, "es.env_seeds": "per_episode", "es.noise_seed": 123,
        "env.obs_stat_prob": 0.01, "env.obs_var_floor": 0.01, "env.obs_clip": 5.0,
        "env.obs_squares": "exact",
        "policy.kind": "mlp", "policy.hidden": [256, 256], "policy.activation": "tanh",
        "policy.action_mapping": "linear", "policy.init": "normc",
        "policy.action_noise_std": 0.01, "policy.action_bins": "continuous"},
}


@pytest.mark.parametrize("job", sorted(REFERENCES))
def test_paper_job_has_its_references_settings(job):
    cfg = flatten(load_job(REPO / "jobs" / f"{job}.yaml").to_dict())
    wrong = {k: (cfg[k], v) for k, v in REFERENCES[job].items() if cfg[k] != v}
    assert not wrong, f"jobs/{job}.yaml (value, reference): {wrong}"
    text = (REPO / "jobs" / f"{job}.yaml").read_text()
    assert text.startswith("# ") and ("Lorenc" in text[:200] or "Salimans" in text[:200])


def test_documented_model_sizes_are_the_models():
    """docs/fidelity.md's size row and the README quote the counts the models report."""
    docs = (REPO / "docs" / "fidelity.md").read_text()
    size_row = next(line for line in docs.splitlines() if line.startswith("| model size"))
    readme = (REPO / "README.md").read_text()
    for job in ("humanoid_mlp", "humanoid_dt", "atari_hero", "humanoid_openai", "atari_hero_cnn"):
        cfg = load_job(REPO / "jobs" / f"{job}.yaml")
        env = make_env(cfg.env)
        policy = make_policy(cfg.policy, env.observation_space, env.action_space, 0,
                             obs_normalized=cfg.env.normalize_obs)
        count = f"{policy.num_params:,}"
        assert count in readme, (job, count)
        if job != "atari_hero_cnn":
            assert count in size_row, (job, count)


def test_obs_sampling_is_per_episode():
    """Both references draw each of the 2N episodes independently with probability p."""
    d = noise.iteration_draws(0, 0, 20_000, 10_000, 10, 0.3, 0)
    assert d.record_obs.shape == (20_000, 2)
    p_plus, p_minus = d.record_obs.mean(axis=0)
    both = (d.record_obs[:, 0] & d.record_obs[:, 1]).mean()
    assert abs(p_plus - 0.3) < 0.02 and abs(p_minus - 0.3) < 0.02
    assert abs(both - 0.09) < 0.01  # independent: p^2, not p


DISTINCT_SEEDS = {"per_iteration": 1, "per_pair": 50, "per_episode": 100}


def test_every_env_seed_mode_is_tested_and_configurable():
    from typing import get_args, get_type_hints

    from es_mpi.config import ESConfig
    assert set(noise.ENV_SEEDS) == set(DISTINCT_SEEDS)
    assert set(get_args(get_type_hints(ESConfig)["env_seeds"])) == set(noise.ENV_SEEDS)


@pytest.mark.parametrize("mode", sorted(noise.ENV_SEEDS))
def test_env_seed_modes(mode):
    distinct = DISTINCT_SEEDS[mode]
    d = noise.iteration_draws(3, 7, 50, 10_000, 10, 0.0, 0, mode)
    assert d.env_seeds.shape == (50, 2) and len(np.unique(d.env_seeds)) == distinct
    again = noise.iteration_draws(3, 7, 50, 10_000, 10, 0.0, 0, mode)
    assert np.array_equal(d.env_seeds, again.env_seeds)  # (seed, t) alone
    assert np.array_equal(d.offsets, noise.iteration_draws(3, 7, 50, 10_000, 10, 0.0, 0).offsets)


def test_episode_seeds_depend_on_seed_iteration_pair_and_sign_only():
    seeds = {noise.episode_seed(1, t, noise.TRAIN_EPISODE, j, s)
             for t in range(3) for j in range(4) for s in (0, 1)}
    assert len(seeds) == 24
    assert noise.episode_seed(1, 2, 0, 3, 1) == noise.episode_seed(1, 2, 0, 3, 1)
    assert noise.episode_seed(1, 2, noise.EVAL_EPISODE, 3, 0) != noise.episode_seed(1, 2, 0, 3, 0)
    assert 0 <= noise.episode_seed(5, 0, 0, 0, 0) < 2**63


# pretraining jobs: the paper job, started from a pretrained file with a smaller lr and sigma
PRETRAINED = {"humanoid_dt_pretrained": "humanoid_dt", "atari_hero_pretrained": "atari_hero"}
FINETUNE_KEYS = {"es.lr": 0.01, "es.sigma": 0.005}


@pytest.mark.parametrize("job", sorted(PRETRAINED))
def test_pretrained_jobs_are_their_paper_job_but_lr_sigma_and_init(job):
    cfg = flatten(load_job(REPO / "jobs" / f"{job}.yaml").to_dict())
    base = flatten(load_job(REPO / "jobs" / f"{PRETRAINED[job]}.yaml").to_dict())
    differ = {k for k in cfg if cfg[k] != base[k]}
    assert differ == {"es.lr", "es.sigma", "run.dir", "run.init_from"}, differ
    assert {k: cfg[k] for k in FINETUNE_KEYS} == FINETUNE_KEYS
    assert cfg["run.init_from"].startswith("pretrained/")
