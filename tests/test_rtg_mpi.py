"""Return-conditioned ES (es.fitness: target_return, es.eval_targets) under real mpiexec: theta and
rows bitwise equal at 1, 2 and 3 ranks under dynamic and static assignment, kill -9 and resume
exact, and `es_mpi.evaluate --rtg` on the trained checkpoint."""
from __future__ import annotations

import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest

from _mpirun_persist import assert_same_rows, theta
from es_mpi.checkpoint import checkpoint_path
from es_mpi.results import read_results
from mpi_helpers import REPO, child_env, mpiexec_path, run_job

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(240)]

JOB = "jobs/pendulum_dt_rtg.yaml"
SMALL = ("es.population=6", "run.iterations=4", "run.checkpoint_every=2",
         "es.noise_table_size=100000", "env.max_episode_steps=30", "es.eval_episodes=1",
         "es.target_range=[5, 30]", "es.eval_targets=[5, 30]", "env.obs_stat_prob=0.5")
LAYOUTS = {"n1": (1, "dynamic"), "n2": (2, "dynamic"), "n3": (3, "dynamic"),
           "n2_static": (2, "static"), "n3_static": (3, "static")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("rtg")
    for name, (n, assignment) in LAYOUTS.items():
        run_job(n, base / name, *SMALL, f"run.assignment={assignment}", job=JOB, timeout=120)
    return base


def test_theta_and_rows_are_bitwise_equal_at_any_rank_count_and_assignment(runs):
    ref = theta(checkpoint_path(runs / "n1", 4))
    for name in LAYOUTS:
        assert theta(checkpoint_path(runs / name, 4)).tobytes() == ref.tobytes(), name
        assert_same_rows(runs / name / "results.h5", runs / "n1" / "results.h5")
    rows = read_results(runs / "n1" / "results.h5")
    assert np.all(rows["target_error_mean"] >= 0) and rows["eval_return_target_1"].shape == (4,)
    with h5py.File(runs / "n1" / "results.h5", "r") as f:
        assert f["iterations/eval_return_target_1"].attrs["target"] == 30.0
    with h5py.File(checkpoint_path(runs / "n1", 2), "r") as f:
        assert not np.array_equal(f["theta"][()], ref)  # theta moved


def test_kill9_then_resume_at_another_rank_count_is_exact(runs, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [mpiexec_path(), "-n", "2", sys.executable, str(REPO / "tests/mpi_scripts/killpoint.py"),
           "append", "2", JOB, f"run.dir={run_dir}", *SMALL]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not checkpoint_path(run_dir, 4).exists()
    again = run_job(3, run_dir, *SMALL, job=JOB, timeout=120)
    assert "ckpt_000002.h5" in again.stdout
    assert theta(checkpoint_path(run_dir, 4)).tobytes() == theta(
        checkpoint_path(runs / "n1", 4)).tobytes()
    assert_same_rows(run_dir / "results.h5", runs / "n1" / "results.h5")


def test_evaluate_rtg_on_a_target_trained_checkpoint(runs):
    proc = subprocess.run([sys.executable, "-m", "es_mpi.evaluate", str(runs / "n2"),
                           "--episodes", "2", "--rtg", "5,30"], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.split()[:2] in
            (["5", "2"], ["30", "2"])]
    assert len(rows) == 2 and all(0 < float(r[4]) <= 30 for r in rows), proc.stdout
