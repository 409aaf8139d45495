"""Spawn `mpiexec -n K python ...` for the Atari tests, always with a timeout.

Same interface as the core's tests/mpi_helpers.py (mpirun, run_job), local to these tests.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A seconds-long Hero run: 2 pairs, 60 agent steps per episode, a 20 MB noise table.
TINY_HERO = ("es.population=2", "run.iterations=2", "env.max_frames=240",
             "es.noise_table_size=5000000", "es.eval_episodes=1", "policy.vbn_batch=16",
             "run.checkpoint_every=1")


def mpiexec_path() -> str:
    local = Path(sys.executable).parent / "mpiexec"
    if local.exists():
        return str(local)
    found = shutil.which("mpiexec")
    if not found:
        raise RuntimeError("no mpiexec found: pip install 'es_mpi[mpich]' or load an MPI module")
    return found


def test_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


test_env.__test__ = False  # not a pytest test


def mpirun(n: int, args: list[str], timeout: float,
           check: bool = True) -> subprocess.CompletedProcess:
    cmd = [mpiexec_path(), "-n", str(n), sys.executable, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=test_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n"
                             f"{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


def run_job(n: int, run_dir: Path, *overrides: str, job: str = "jobs/atari_hero_cnn.yaml",
            timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    return mpirun(n, ["-m", "es_mpi.run", job, f"run.dir={run_dir}", *overrides],
                  timeout=timeout, check=check)
