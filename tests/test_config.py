"""Job config: loading, overrides, validation messages that name the key."""
from pathlib import Path

import pytest

from es_mpi import config
from es_mpi.config import ConfigError, load_job

REPO = Path(__file__).resolve().parents[1]
QUICK = REPO / "jobs" / "quickstart.yaml"


def test_every_shipped_job_loads():
    for path in sorted((REPO / "jobs").glob("*.yaml")):
        cfg = load_job(path)
        assert cfg.run.iterations > 0 and cfg.es.population > 0, path


def test_paper_mlp_job_has_reference_settings():
    cfg = load_job(REPO / "jobs" / "humanoid_mlp.yaml")
    assert (cfg.env.id, cfg.es.population, cfg.run.iterations) == ("Humanoid-v4", 5000, 200)
    assert (cfg.es.sigma, cfg.es.optimizer, cfg.es.momentum, cfg.es.lr) == (0.02, "sgd", 0.9, 0.05)
    assert (cfg.es.weight_decay, cfg.es.weight_decay_mode) == (0.005, "decoupled")
    assert (cfg.es.noise_table_size, cfg.env.obs_stat_prob) == (250_000_000, 0.01)


def test_overrides_are_typed_yaml_values():
    cfg = load_job(QUICK, ["es.sigma=0.5", "run.iterations=7", "policy.hidden=[8, 4]",
                           "env.max_episode_steps=null", "es.optimizer=sgd", "env.kwargs.reset_noise_scale=0.1"])
    assert cfg.es.sigma == 0.5 and isinstance(cfg.es.sigma, float)
    assert cfg.run.iterations == 7
    assert cfg.policy.hidden == [8, 4]
    assert cfg.env.max_episode_steps is None
    assert cfg.es.optimizer == "sgd"
    assert cfg.env.kwargs == {"reset_noise_scale": 0.1}


def test_int_accepted_for_float_and_integral_float_for_int():
    cfg = load_job(QUICK, ["es.sigma=1", "es.population=10.0"])
    assert cfg.es.sigma == 1.0 and cfg.es.population == 10


@pytest.mark.parametrize("override, fragment", [
    ("es.sigmaa=0.1", "unknown key 'es.sigmaa'"),
    ("es.population=-5", "es.population: must be a positive integer, got -5"),
    ("es.population=abc", "es.population: expected an integer, got 'abc'"),
    ("es.optimizer=rmsprop", "es.optimizer: expected one of 'sgd', 'adam'"),
    ("es.sigma=0", "es.sigma: must be a positive number"),
    ("optim.lr=0.1", "unknown section 'optim'"),
    ("run.seed", "expected section.key=value"),
    ("seed=3", "key must be section.key"),
    ("policy.hidden=[0]", "policy.hidden: must be a non-empty list of positive integers"),
    ("env.obs_stat_prob=2", "env.obs_stat_prob: must be a probability"),
    ("run.verify_every=true", "run.verify_every: expected an integer, got True"),
])
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_job(QUICK, [override])
    assert fragment in str(info.value)


def test_unknown_key_lists_allowed_keys():
    with pytest.raises(ConfigError, match="allowed keys in 'es': .*sigma"):
        load_job(QUICK, ["es.sigmaa=0.1"])


def test_required_keys(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("es: {population: 4}\nrun: {seed: 1, dir: x}\n")
    with pytest.raises(ConfigError, match="required key\\(s\\) missing: run.iterations, es.sigma"):
        load_job(job)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_job(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("es: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job(bad)


def test_resolved_yaml_round_trips():
    cfg = load_job(QUICK, ["es.sigma=0.25"])
    assert config.loads(cfg.to_yaml()) == cfg


def test_overrides_fill_an_empty_section(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("env:\nes: {population: 4, sigma: 0.1}\nrun: {seed: 1, iterations: 2, dir: x}\n")
    cfg = load_job(job, ["env.id=Hopper-v5", "env.kwargs.reset_noise_scale=0.1"])
    assert cfg.env.id == "Hopper-v5" and cfg.env.kwargs == {"reset_noise_scale": 0.1}
    with pytest.raises(ConfigError, match="env.id: expected a string"):
        load_job(job, ["env.id.x=1"])


def test_flatten():
    assert config.flatten({"a": {"b": 1, "c": {}}, "d": 2}) == {"a.b": 1, "a.c": {}, "d": 2}
