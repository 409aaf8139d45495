"""Every paper job names every key that can change a number it computes, so a changed default
cannot move it. The list comes from the configuration (config.number_keys: every key of every
section, less config.NUMBER_FREE_KEYS and the keys that config.KEY_SCOPE puts out of the job's
reach), so a key added to config.py is required of these jobs until they set it or its scope
says they need not. The scopes themselves are checked by running a job with every key outside
its scope changed: theta must not move."""
from __future__ import annotations

import dataclasses
import functools
import json
import typing
from pathlib import Path

import numpy as np
import pytest
import yaml

from es_mpi.config import (KEY_CONDITIONS, KEY_SCOPE, NUMBER_FREE_KEYS, ConfigError, all_keys,
                           flatten, load_job, number_keys)
from mpi_helpers import REPO, TINY, final_theta_and_rows, run_job

# the paper jobs, and the full-scale extensions that state which keys they take from them
EXPLICIT = ("humanoid_mlp", "humanoid_dt", "humanoid_dt_half_population",
            "humanoid_dt_pretrained", "humanoid_openai", "atari_hero", "atari_hero_no_norm",
            "atari_hero_pretrained", "atari_hero_cnn", "humanoid_dt_rtg")
# laptop-sized demonstrations: short files that take the defaults (README, "Jobs and overrides")
SHORT = ("quickstart", "quickstart_dt", "pendulum_dt_rtg")


@functools.lru_cache(maxsize=None)
def discrete_actions(env_id: str) -> bool:
    """Whether the real environment's action space is Discrete (one env built per id)."""
    import gymnasium as gym

    from es_mpi.envs import make_env

    env = make_env(load_job(REPO / "jobs/quickstart.yaml", [f"env.id={env_id}"]).env)
    env.close()
    return isinstance(env.action_space, gym.spaces.Discrete)


def named_keys(job_text: str) -> set[str]:
    """The section.key names a job file sets (a mapping value such as env.kwargs: {a: 1} names
    env.kwargs)."""
    flat = flatten(yaml.safe_load(job_text) or {})
    return {k for key in flat for k in all_keys() if key == k or key.startswith(k + ".")}


def unnamed(path: Path) -> list[str]:
    cfg = load_job(path)
    named = named_keys(path.read_text())
    return [k for k in number_keys(cfg, discrete_actions(cfg.env.id)) if k not in named]


def test_every_job_is_classified():
    jobs = {p.stem for p in (REPO / "jobs").glob("*.yaml")}
    assert jobs == set(EXPLICIT) | set(SHORT) and not set(EXPLICIT) & set(SHORT)


@pytest.mark.parametrize("job", EXPLICIT)
def test_job_names_every_key_that_can_change_a_number(job):
    missing = unnamed(REPO / "jobs" / f"{job}.yaml")
    assert not missing, f"jobs/{job}.yaml relies on the defaults of {missing}"


def test_a_job_that_omits_a_key_fails(tmp_path):
    text = (REPO / "jobs/humanoid_mlp.yaml").read_text()
    kept = [line for line in text.splitlines()
            if not line.lstrip().startswith(("noise_seed:", "init_from:", "kwargs:"))]
    path = tmp_path / "humanoid_mlp.yaml"
    path.write_text("\n".join(kept) + "\n")
    assert unnamed(path) == ["env.kwargs", "es.noise_seed", "run.init_from"]
    path.write_text("\n".join(kept).replace("env:", "env:\n  kwargs: {width: 64}") + "\n")
    assert unnamed(path) == ["es.noise_seed", "run.init_from"]


def test_scope_table_is_consistent():
    from es_mpi.resume import RESUME_IGNORED_KEYS

    keys = set(all_keys())
    assert set(KEY_SCOPE) <= keys and set(NUMBER_FREE_KEYS) <= keys
    assert not set(KEY_SCOPE) & set(NUMBER_FREE_KEYS)
    used = {c for conds in KEY_SCOPE.values() for c in conds}
    assert used == set(KEY_CONDITIONS)
    assert RESUME_IGNORED_KEYS == ("run.iterations", *NUMBER_FREE_KEYS)


@pytest.mark.parametrize("job, required, free", [
    ("humanoid_mlp", {"es.noise_seed", "policy.init", "env.max_episode_steps", "run.init_from",
                      "es.momentum", "policy.action_bins", "env.obs_clip", "es.fitness"},
     {"run.dir", "run.assignment", "policy.context", "env.frame_skip", "es.adam_beta1",
      "policy.discrete_action", "es.target_range", "es.eval_targets", "policy.vbn"}),
    ("humanoid_openai", {"es.adam_eps", "policy.action_noise_std"}, {"es.momentum"}),
    ("humanoid_dt", {"policy.inference", "policy.scaled_residual_init", "policy.inner_mult",
                     "es.eval_targets", "policy.action_mapping"},
     {"policy.hidden", "policy.embed_init", "policy.action_bins", "policy.init"}),
    ("humanoid_dt_rtg", {"es.target_range", "es.target_return_weight"}, {"es.target_values"}),
    ("atari_hero", {"env.frame_skip", "env.max_pool_frames", "policy.embed_init",
                    "policy.discrete_action", "policy.frame_scale", "policy.vbn"},
     {"policy.hidden", "policy.action_mapping", "policy.action_bins", "policy.vbn_batch"}),
    ("atari_hero_no_norm", set(), {"env.obs_clip", "env.obs_stat_prob", "env.obs_var_floor"}),
    ("atari_hero_cnn", {"policy.vbn_batch", "policy.frame_scale"}, {"policy.context"}),
])
def test_number_keys_follow_the_job(job, required, free):
    cfg = load_job(REPO / "jobs" / f"{job}.yaml")
    keys = set(number_keys(cfg, discrete_actions(cfg.env.id)))
    assert required <= keys and not free & keys


# ----------------------------------------------------- the scopes: keys out of scope move nothing
def _candidates(value: typing.Any, tp: typing.Any) -> list:
    """Other values of a key's type to try (the first valid one is used)."""
    return [c for c in _alternatives(value, tp) if c != value]


def _alternatives(value: typing.Any, tp: typing.Any) -> list:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return [a for a in typing.get_args(tp) if a != value]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value * 2]
    if isinstance(value, float):
        return [value / 2, value * 2, value + 0.1, 0.5]
    if isinstance(value, list):
        return [[0.0, 1.0], [1.0], [8]]
    if isinstance(value, str):
        return ["uniform:3"]
    if value is None:
        return [3.0, 30]
    return []


def _perturbations(job: Path, base: list[str]) -> list[str]:
    """One override per key outside the job's scope that the job accepts, all together."""
    from es_mpi.envs import make_env
    from es_mpi.runtime import build_policy

    cfg = load_job(job, base)
    discrete = discrete_actions(cfg.env.id)
    outside = [k for k in all_keys() if k not in number_keys(cfg, discrete)
               and k not in NUMBER_FREE_KEYS]
    values = flatten(dataclasses.asdict(cfg))
    hints = {f"{s}.{k}": t for s, section in (("env", cfg.env), ("policy", cfg.policy),
                                                ("es", cfg.es), ("run", cfg.run))
             for k, t in typing.get_type_hints(type(section)).items()}
    kept: list[str] = []
    env = make_env(cfg.env)
    for key in outside:
        for alt in _candidates(values[key], hints[key]):
            trial = kept + [f"{key}={json.dumps(alt)}"]
            try:
                build_policy(load_job(job, base + trial), env)
            except ConfigError:
                continue
            kept = trial
            break
    env.close()
    return kept




@pytest.mark.mpi
@pytest.mark.timeout(300)
@pytest.mark.parametrize("job", ["quickstart", "quickstart_dt"])
def test_keys_out_of_scope_change_no_number(tmp_path, job):
    path = REPO / "jobs" / f"{job}.yaml"
    base = list(TINY)
    changed = _perturbations(path, base)
    assert len(changed) >= 20, changed  # Atari, DT or MLP, optimiser, target and VBN keys
    run_job(1, tmp_path / "base", *base, job=str(path))
    run_job(1, tmp_path / "changed", *base, *changed, job=str(path))
    theta, rows = final_theta_and_rows(tmp_path / "base")
    theta2, rows2 = final_theta_and_rows(tmp_path / "changed")
    assert np.array_equal(theta.view(np.uint32), theta2.view(np.uint32)), changed
    for key, values in rows.items():
        assert np.array_equal(rows2[key], values), key
