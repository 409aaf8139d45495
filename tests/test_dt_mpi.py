"""The DT job under real MPI (1 and 2 ranks) and `python -m es_mpi.evaluate` on its checkpoint."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

import mpi_helpers
from mpi_helpers import REPO, run_job

JOB = "jobs/humanoid_dt.yaml"
SMALL = ("es.population=8", "run.iterations=2", "es.noise_table_size=2000000",
         "env.max_episode_steps=25", "env.obs_stat_prob=0.5")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("dt")
    for n in (1, 2):
        run_job(n, base / f"n{n}", *SMALL, job=JOB, timeout=240)
    return base


def theta(run_dir):
    with h5py.File(run_dir / "checkpoints" / "ckpt_000002.h5", "r") as f:
        return f["theta"][()]


@pytest.mark.timeout(400)
def test_dt_job_theta_size_and_rank_count_invariance(runs):
    t1, t2 = theta(runs / "n1"), theta(runs / "n2")
    assert t1.dtype == np.float32 and t1.size == 824_970
    assert np.array_equal(t1.view(np.uint32), t2.view(np.uint32))  # bitwise, 1 vs 2 ranks
    with h5py.File(runs / "n2" / "checkpoints" / "ckpt_000002.h5", "r") as f:
        assert f["obs_stats"].attrs["count"] > 1  # observation statistics were gathered


def evaluate(*args: str, timeout: float = 240) -> str:
    proc = subprocess.run([sys.executable, "-m", "es_mpi.evaluate", *args], cwd=REPO,
                          env=mpi_helpers.child_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.timeout(400)
def test_evaluate_rtg_table_is_reproducible(runs):
    args = (str(runs / "n2"), "--episodes", "2", "--rtg", "-1000,0,1000000")
    out = evaluate(*args)
    rows = [line.split() for line in out.splitlines()
            if re.match(r"^\s*(-1000|0|1e\+06)\s+2\s", line)]
    assert [r[0] for r in rows] == ["-1000", "0", "1e+06"], out
    returns = [float(r[2]) for r in rows]
    assert all(np.isfinite(returns)) and all(0 < float(r[4]) <= 25 for r in rows)
    assert evaluate(*args) == out  # same seed -> same returns


@pytest.mark.timeout(400)
def test_evaluate_video_is_a_playable_non_black_mp4(runs, tmp_path):
    imageio = pytest.importorskip("imageio.v2")
    video = tmp_path / "dt.mp4"
    out = evaluate(str(runs / "n2" / "checkpoints" / "ckpt_000002.h5"), "--episodes", "1",
                   "--max-steps", "8", "--video", str(video), "--video-size", "96x96")
    assert "video:" in out
    frames = [frame for frame in imageio.get_reader(str(video))]  # (list() asks len(): inf)
    assert 2 <= len(frames) <= 9 and frames[0].shape == (96, 96, 3)
    last = np.asarray(frames[-1], dtype=np.float64)
    assert last.mean() > 20 and last.std() > 10  # a rendered scene, not a black frame


def test_evaluate_never_imports_mpi(runs):
    code = ("import sys; from es_mpi.evaluate import main; "
            f"assert main([{str(runs / 'n1')!r}, '--episodes', '1']) == 0; "
            "assert 'mpi4py' not in sys.modules and 'es_mpi.comm' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=mpi_helpers.child_env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_evaluate_run_dir_skips_a_corrupt_newest_checkpoint(runs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(runs / "n1", run_dir)
    good = run_dir / "checkpoints" / "ckpt_000002.h5"
    bad = run_dir / "checkpoints" / "ckpt_000003.h5"
    bad.write_bytes(good.read_bytes()[:5000])  # a torn newer file
    proc = subprocess.run([sys.executable, "-m", "es_mpi.evaluate", str(run_dir),
                           "--episodes", "1"], cwd=REPO, env=mpi_helpers.child_env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ckpt_000002.h5 (iteration 2)" in proc.stdout and "corrupt" in proc.stderr


def test_evaluate_missing_path_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "es_mpi.evaluate", str(tmp_path / "nope")],
                          cwd=REPO, env=mpi_helpers.child_env(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "no such checkpoint" in proc.stderr
