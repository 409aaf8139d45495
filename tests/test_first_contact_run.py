"""What a first user of `python -m es_mpi.run` meets: number spellings, non-finite values,
repeated overrides, usage, --print-config, degenerate settings, a diverging run, Ctrl-C."""
from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import typing

import numpy as np
import pytest

from _mpirun_persist import (ROOT, env, kill_job, n_rows, run_job, start_job, theta,
                             wait_for)
from es_mpi import config
from es_mpi.checkpoint import list_checkpoints
from es_mpi.config import ConfigError, load_job
from es_mpi.launch import EXIT_ABORTED, EXIT_DIVERGED, EXIT_PREEMPTED

QUICK = ROOT / "jobs" / "quickstart.yaml"


# ----------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("override, key, value", [
    ("es.lr=1e-3", "lr", 1e-3), ("es.lr=1E-3", "lr", 1e-3), ("es.sigma=+1.5", "sigma", 1.5),
    ("es.sigma=.5", "sigma", 0.5), ("es.sigma=5.", "sigma", 5.0), ("es.lr=.5e-2", "lr", 5e-3),
    ("es.population=1_000", "population", 1000), ("es.population=1e3", "population", 1000),
    ("es.noise_table_size=2E6", "noise_table_size", 2_000_000),
    ("es.lr='1e-3'", "lr", 1e-3),  # quoted: still a number where a number is expected
])
def test_every_spelling_of_a_number_is_accepted_on_the_command_line(override, key, value):
    got = getattr(load_job(QUICK, [override]).es, key)
    assert got == value and type(got) is type(value)


def test_every_spelling_of_a_number_is_accepted_in_a_job_file(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("es: {population: 4e1, sigma: 1E-1, lr: 1e-3, target_range: [0, 1e3]}\n"
                   "env: {kwargs: {reset_noise_scale: 1e-2}}\n"
                   "run: {seed: 0, iterations: 1e1, dir: x}\n")
    cfg = load_job(job)
    assert (cfg.es.population, cfg.es.sigma, cfg.es.lr, cfg.run.iterations) == (40, 0.1, 1e-3, 10)
    assert cfg.es.target_range == [0, 1000.0]
    assert cfg.env.kwargs == {"reset_noise_scale": 0.01}
    assert config.loads(cfg.to_yaml()) == cfg


@pytest.mark.parametrize("override, message", [
    ("es.lr=abc", "es.lr: expected a number, got 'abc'"),
    ("es.lr=1e-3x", "es.lr: expected a number, got '1e-3x'"),
    ("es.population=1.5e0", "es.population: expected an integer, got 1.5"),
    ("es.lr=1e300", "es.lr: must be a positive number below 3.4e38 (theta is float32), got 1e+300"),
    ("es.sigma=3.5e38", "es.sigma: must be a positive number below 3.4e38"),
])
def test_a_non_number_is_named_as_such_and_absurd_steps_are_refused(override, message):
    with pytest.raises(ConfigError) as info:
        load_job(QUICK, [override])
    assert message in str(info.value)


def numeric_keys() -> list[str]:
    """Every key whose type is float or int, or either of them or null."""
    out = []
    for section, cls in config._SECTION_CLASSES.items():
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            if tp in (int, float) or {int, float} & set(typing.get_args(tp)):
                out.append(f"{section}.{f.name}")
    return out


def test_every_numeric_key_refuses_non_finite_values():
    keys = numeric_keys()
    assert {"es.lr", "es.sigma", "env.obs_clip", "policy.frame_scale", "es.population",
            "env.max_episode_steps"} <= set(keys)
    for key in keys:
        for spelling in (".inf", ".nan", "-Inf"):
            with pytest.raises(ConfigError, match=f"{key}: must be a finite number"):
                load_job(QUICK, [f"{key}={spelling}"])


def test_repeated_overrides_are_named():
    from es_mpi.config import repeated_overrides
    assert repeated_overrides(["es.lr=0.1", "es.sigma=1", "es.lr=0.2"]) == [
        "es.lr is given 2 times (0.1, 0.2); the last one, 0.2, is used"]
    assert repeated_overrides(["es.lr=0.1", "es.sigma=1"]) == []


# ----------------------------------------------------------------------------- the command
def cli(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    """`python -m es_mpi.run ARGS` alone (no mpiexec)."""
    return subprocess.run([sys.executable, "-m", "es_mpi.run", *args], cwd=cwd, env=env(),
                          capture_output=True, text=True, timeout=60)


def test_usage_names_the_job_file():
    from es_mpi.run import parse_args
    with pytest.raises(SystemExit) as info:
        parse_args([])
    assert info.value.code == 2


def test_print_config_prints_the_resolved_job_and_runs_nothing(tmp_path):
    run_dir = tmp_path / "never"
    proc = cli(str(QUICK), f"run.dir={run_dir}", "es.lr=1e-3", "es.lr=2e-3", "--print-config",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert config.loads(proc.stdout) == load_job(QUICK, [f"run.dir={run_dir}", "es.lr=2e-3"])
    assert "es.lr is given 2 times" in proc.stderr
    assert not run_dir.exists() and list(tmp_path.iterdir()) == []
    bad = cli(str(QUICK), "es.lr=.nan", "--print-config")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip() == ("es_mpi: configuration error: es.lr: must be a finite "
                                  "number, got nan")
    usage = cli()
    assert usage.returncode == 2 and "JOB.yaml" in usage.stderr and "overrides" not in usage.stderr


# ----------------------------------------------------------------------------- degenerate settings
def test_degenerate_settings_are_refused_or_warned(tmp_path):
    from es_mpi.runtime import build_policy, dubious_settings, preflight

    def cfg(*overrides):
        return load_job(QUICK, [f"run.dir={tmp_path}", *overrides])

    with pytest.raises(ConfigError, match="es.population=10,000,000,000: every rank would hold"):
        preflight(cfg("es.population=10000000000"), True)
    env = preflight(cfg(), True)
    with pytest.raises(ConfigError, match="holds 52 distinct perturbations .* every iteration"):
        build_policy(cfg("es.population=2000", "es.noise_table_size=1300"), env)
    few = cfg("es.population=40", "es.noise_table_size=3000")
    (warning,) = dubious_settings(few, env, build_policy(few, env))
    assert "1,752 distinct perturbations" in warning and "share their perturbation" in warning
    shipped = cfg()
    assert dubious_settings(shipped, env, build_policy(shipped, env)) == []


def test_an_mlp_on_atari_frames_is_warned_about():
    from es_mpi.envs import make_env
    from es_mpi.runtime import build_policy, dubious_settings
    cfg = load_job(ROOT / "jobs" / "atari_hero.yaml", ["policy.kind=mlp", "policy.hidden=[8]"])
    env = make_env(cfg.env)
    (warning,) = dubious_settings(cfg, env, build_policy(cfg, env))
    assert "policy.kind mlp on image observations of shape (4, 84, 84)" in warning
    assert "dt" in warning and "cnn" in warning


def test_init_from_lists_only_the_keys_of_the_jobs_policy_kind():
    from es_mpi.init_from import _differences
    mlp = load_job(QUICK)
    dt = load_job(ROOT / "jobs" / "quickstart_dt.yaml")
    listed = [line.split(":")[0] for line in _differences(mlp.to_yaml(), dt)]
    assert "policy.kind" in listed
    assert not {"policy.hidden", "policy.activation"} & set(listed)


def test_check_finite_names_the_quantity_the_count_and_the_iteration():
    from es_mpi.iteration import Diverged, check_finite
    check_finite(3, {"theta": np.ones(4, np.float32)})
    with pytest.raises(Diverged, match=r"^returns: 2 of 6 values are not finite in iteration 7$"):
        check_finite(7, {"theta": np.ones(4), "returns": np.array([1, np.nan, 2, np.inf, 0, 1])})


# ----------------------------------------------------------------------------- under mpiexec
@pytest.fixture(scope="module")
def diverged(tmp_path_factory):
    """Adam with es.lr=3e38: theta is finite after iteration 0 (~1e38) and inf after 1."""
    run_dir = tmp_path_factory.mktemp("diverged") / "run"
    proc = run_job(2, run_dir, ["es.lr=3e38", "run.iterations=5", "run.checkpoint_every=1"])
    return run_dir, proc


@pytest.mark.mpi
@pytest.mark.timeout(120)
def test_a_diverging_run_stops_with_exit_5_keeping_its_finite_checkpoints(diverged):
    run_dir, proc = diverged
    assert proc.returncode == EXIT_DIVERGED, proc.stderr
    assert proc.stderr.count("es_mpi: diverged: theta: ") == 1  # rank 0 alone reports
    assert "values are not finite in iteration 1" in proc.stderr
    assert "Traceback" not in proc.stderr
    (k, ckpt), = list_checkpoints(run_dir)
    assert k == 1 and f"the newest checkpoint is {ckpt}" in proc.stderr
    assert np.isfinite(theta(ckpt)).all() and n_rows(run_dir / "results.h5") == 1


@pytest.mark.mpi
@pytest.mark.timeout(120)
def test_the_start_line_names_init_from_and_counts_one_rank(diverged, tmp_path):
    (_, ckpt), = list_checkpoints(diverged[0])
    proc = run_job(1, tmp_path / "run", ["run.iterations=1", f"run.init_from={ckpt}"])
    assert proc.returncode == 0, proc.stderr
    assert f"parameters, theta from run.init_from {ckpt}, 1 rank, population" in proc.stdout


@pytest.mark.mpi
@pytest.mark.timeout(120)
def test_ctrl_c_at_the_terminal_checkpoints_and_exits_3(tmp_path):
    """The terminal sends SIGINT to mpiexec's process group; hydra forwards it to the ranks."""
    run_dir = tmp_path / "run"
    proc = start_job(2, run_dir, ["es.population=24", "run.iterations=200",
                                  "run.checkpoint_every=1000"])
    try:
        assert wait_for(lambda: n_rows(run_dir / "results.h5") >= 1, 90, 0.05, proc)
        kill_job(proc, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        kill_job(proc)
    assert proc.returncode == EXIT_PREEMPTED, err
    assert "preempted (rank 0: SIGINT, rank 1: SIGINT)" in out
    assert err.count("es_mpi: interrupted (SIGINT)") == 1 and "Traceback" not in err
    (k, _), = list_checkpoints(run_dir)
    assert n_rows(run_dir / "results.h5") == k and "run the same command to resume" in out


@pytest.mark.mpi
@pytest.mark.timeout(120)
def test_a_second_ctrl_c_aborts_at_once_without_a_traceback(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "es_mpi.run", str(QUICK), f"run.dir={run_dir}",
           "es.population=5000", "es.noise_table_size=1000000", "run.iterations=3"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert wait_for(lambda: (run_dir / "results.h5").exists(), 90, 0.02, proc)
        for _ in range(2):  # within iteration 0, which takes seconds
            kill_job(proc, signal.SIGINT)
            wait_for(lambda: False, 0.3)
        out, err = proc.communicate(timeout=30)
    finally:
        kill_job(proc)
    assert proc.returncode == EXIT_ABORTED, err
    assert err.count("es_mpi: aborted by a second SIGINT") == 1 and "Traceback" not in err
    assert not list_checkpoints(run_dir)


@pytest.mark.parametrize("is_root", [True, False])
def test_the_ale_banner_comes_from_rank_0_alone(tmp_path, is_root):
    script = (f"from es_mpi.config import load_job\nfrom es_mpi.runtime import preflight\n"
              f"cfg = load_job({str(ROOT / 'jobs' / 'atari_hero.yaml')!r}, "
              f"['run.dir={tmp_path}'])\npreflight(cfg, {is_root}).reset(seed=0)\n")
    proc = subprocess.run([sys.executable, "-c", script], env=env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert ("A.L.E: Arcade Learning Environment" in proc.stderr) is is_root
