"""Spawn `mpiexec -n K python ...` from tests, always with a timeout."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def mpiexec_path() -> str:
    """The mpiexec next to this Python (pip's mpich wheel), else the one on PATH."""
    local = Path(sys.executable).parent / "mpiexec"
    if local.exists():
        return str(local)
    found = shutil.which("mpiexec")
    if not found:
        raise RuntimeError("no mpiexec found: pip install 'es_mpi[mpich]' or load an MPI module")
    return found


def child_env(**extra: str) -> dict:
    """This environment, plus the repo on PYTHONPATH and one thread per process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.setdefault(var, "1")
    env["PYTHONUNBUFFERED"] = "1"
    # no progress lines inside iterations (a loaded machine could make one >10 s and add a
    # line to output a test counts); the progress tests set ES_MPI_PROGRESS themselves
    env.setdefault("ES_MPI_PROGRESS", "1e9,1e9")
    env.update(extra)
    return env


def mpirun(n: int, args: list[str], timeout: float, cwd: str | Path = REPO,
           env: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """Run `mpiexec -n n <python> args...`; raises subprocess.TimeoutExpired past `timeout`."""
    cmd = [mpiexec_path(), "-n", str(n), sys.executable, *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env or child_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n"
                             f"{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


def run_job(n: int, run_dir: Path, *overrides: str, job: str = "jobs/quickstart.yaml",
            timeout: float = 120, check: bool = True,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """`mpiexec -n n python -m es_mpi.run JOB run.dir=RUN_DIR overrides...`."""
    return mpirun(n, ["-m", "es_mpi.run", job, f"run.dir={run_dir}", *overrides],
                  timeout=timeout, check=check, env=env)


# A tiny quickstart: seconds per run at any rank count.
TINY = ("es.population=6", "run.iterations=3", "es.noise_table_size=1000000",
        "es.eval_episodes=1", "env.obs_stat_prob=0.5")


FINAL_COLUMNS = ("fitness_mean", "eval_return", "timesteps")


def final_theta_and_rows(run_dir: Path, columns=FINAL_COLUMNS, iteration: int = 3):
    """(theta of checkpoint `iteration`, {column: values} of results.h5) of a finished run;
    columns=None: every column."""
    import h5py

    with h5py.File(Path(run_dir) / "checkpoints" / f"ckpt_{iteration:06d}.h5", "r") as f:
        theta = f["theta"][()]
    with h5py.File(Path(run_dir) / "results.h5", "r") as f:
        names = f["iterations"] if columns is None else columns
        rows = {k: f["iterations"][k][()] for k in names}
    return theta, rows
