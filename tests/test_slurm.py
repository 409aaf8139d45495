"""The slurm/*.sh templates on a real (local, single-node) SLURM: arrays, preemption, refusal.

Each job is the same template users submit, shrunk on the sbatch command line (--ntasks,
--time, --array, --output) and pointed at the quickstart job through ES_JOB / ES_OVERRIDES.
The cluster tests need root and apt (tests/slurm_cluster.py); elsewhere they skip, saying why.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from es_mpi.launch import launcher_mismatch
import slurm_cluster as cluster_module
from slurm_cluster import slurm_cluster  # noqa: F401  (pytest fixture)

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = ("humanoid_mlp", "humanoid_dt", "atari_hero")
# the quickstart, small enough that a 2-rank run takes seconds on 2 cores
TINY = ("es.population=8 es.noise_table_size=2000000 env.max_episode_steps=100 "
        "es.eval_episodes=2")
EXIT_LAUNCHER_ERROR = 4


# --- static checks (no SLURM needed)

@pytest.mark.parametrize("name", TEMPLATES)
def test_template_parses_and_has_the_directives(name: str) -> None:
    path = REPO / "slurm" / f"{name}.sh"
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    text = path.read_text()
    directives = re.findall(r"^#SBATCH\s+(\S+)", text, flags=re.M)
    for needed in ("--array=0-9", "--requeue", "--open-mode=append", "--cpus-per-task=1"):
        assert needed in directives, f"{name}.sh lacks #SBATCH {needed}"
    assert any(d.startswith("--signal=B:USR1@") for d in directives)
    assert any(d.startswith("--ntasks=") for d in directives)
    assert any(d.startswith("--time=") for d in directives)
    assert f"jobs/{name}.yaml" in text and (REPO / "jobs" / f"{name}.yaml").is_file()
    assert not re.search(r"^[^#]*(/home/|/opt/|/work/|/scratch/)", text, flags=re.M), \
        "machine-specific path in a template"
    readme = (REPO / "README.md").read_text()
    assert f"slurm/{name}.sh" in readme


def test_shared_body_parses() -> None:
    assert subprocess.run(["bash", "-n", str(REPO / "slurm" / "es_job.sh")]).returncode == 0


@pytest.mark.parametrize("env,size,refused", [
    ({}, 1, False),                                             # laptop, no SLURM
    ({"SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2"}, 1, True),  # plain srun, no PMI
    ({"SLURM_NTASKS": "4"}, 1, True),                           # python run in the batch shell
    ({"SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2"}, 2, False),  # srun --mpi=pmi2
    ({"SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1"}, 2, False),  # hydra's proxy step
    ({"SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "1"}, 1, False),  # srun -n 1 on purpose
    ({"SLURM_NTASKS": "4", "ES_ALLOW_SINGLETON": "1"}, 1, False),
])
def test_launcher_mismatch(env: dict, size: int, refused: bool) -> None:
    msg = launcher_mismatch(env, size)
    assert (msg is not None) == refused
    if refused:
        assert "srun --mpi=pmi2" in msg and "mpiexec" in msg


def test_cluster_skips_with_a_reason_when_not_root(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    cluster, why = cluster_module.start_or_skip_reason(parent=str(tmp_path))
    assert cluster is None and "root" in why
    assert not list(tmp_path.iterdir()), "the temporary directory was left behind"


# --- on a real SLURM

def job_env(tmp_path: Path, **extra: str) -> dict:
    bindir = str(Path(sys.executable).parent)  # the venv's python and mpiexec
    # ES_HOME and PYTHONPATH are left to the template: the submit directory (REPO)
    return dict(ES_JOB="jobs/quickstart.yaml", ES_RUN_ROOT=str(tmp_path / "runs"),
                ES_PYTHON=sys.executable,
                PATH=bindir + os.pathsep + os.environ.get("PATH", ""), **extra)


def submit(cluster, tmp_path: Path, env: dict, *sbatch_args: str) -> str:
    return cluster.sbatch("--time=10", "--signal=B:USR1@60", f"--output={tmp_path}/%x_%a.log",
                          *sbatch_args, str(REPO / "slurm" / "humanoid_mlp.sh"),
                          env=env, cwd=str(REPO))


def by_task(records: list[dict]) -> dict[int, dict]:
    return {int(r["ArrayTaskId"]): r for r in records}


def final_theta(run_dir: Path) -> np.ndarray:
    newest = sorted((run_dir / "checkpoints").glob("ckpt_*.h5"))[-1]
    with h5py.File(newest, "r") as f:
        return f["theta"][...]


def iterations(run_dir: Path) -> np.ndarray:
    with h5py.File(run_dir / "results.h5", "r") as f:
        return f["iterations/iteration"][...]


def fail_info(cluster, tmp_path: Path) -> str:
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in tmp_path.glob("*.log"))
    return logs + "\n" + cluster.logs()


@pytest.mark.slurm
@pytest.mark.timeout(240)
def test_array_of_two_seeds_completes(slurm_cluster, tmp_path: Path) -> None:
    """The quickstart through slurm/humanoid_mlp.sh: 2 tasks x 2 array elements, srun --mpi=pmi2."""
    env = job_env(tmp_path, ES_OVERRIDES=TINY + " run.iterations=4", ES_LAUNCHER="srun")
    job = submit(slurm_cluster, tmp_path, env, "--ntasks=2", "--array=0-1")
    tasks = by_task(slurm_cluster.wait_done(job, 180))
    info = fail_info(slurm_cluster, tmp_path)
    assert sorted(tasks) == [0, 1], info
    thetas = []
    for i, rec in tasks.items():
        assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", info
        assert rec["Restarts"] == "0", info
        run_dir = tmp_path / "runs" / f"seed{i}"
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["run"]["seed"] == i
        assert iterations(run_dir).tolist() == [0, 1, 2, 3]
        log = (tmp_path / f"humanoid_mlp_{i}.log").read_text()
        assert f"seed {i} in {run_dir}" in log and "2 ranks" in log, log
        thetas.append(final_theta(run_dir))
    assert thetas[0].shape == thetas[1].shape
    assert not np.array_equal(thetas[0], thetas[1]), "two seeds gave the same theta"


@pytest.mark.slurm
@pytest.mark.timeout(300)
@pytest.mark.parametrize("launcher", ["mpiexec", "srun"])
def test_preempted_task_requeues_resumes_bitwise(slurm_cluster, tmp_path: Path,
                                                 launcher: str) -> None:
    """USR1 to the batch shell of the array's last task (whose SLURM_JOB_ID is the array's id)
    mid-run: the template forwards it through the launcher, the ranks checkpoint and exit 3,
    the task alone is requeued, resumes, and ends with the theta of an uninterrupted run;
    every iteration is in results.h5 once."""
    iters, seed = 24, 1
    overrides = TINY + f" run.iterations={iters} run.checkpoint_every=10"
    env = job_env(tmp_path, ES_OVERRIDES=overrides, ES_LAUNCHER=launcher)
    job = submit(slurm_cluster, tmp_path, env, "--ntasks=2", "--array=0-1")
    log = tmp_path / f"humanoid_mlp_{seed}.log"
    deadline = time.monotonic() + 150
    while not (log.exists() and re.search(r"^iter\s+[5-9]\b", log.read_text(), re.M)):
        assert time.monotonic() < deadline, fail_info(slurm_cluster, tmp_path)
        time.sleep(0.1)
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", f"{job}_{seed}")
    tasks = by_task(slurm_cluster.wait_done(job, 200))
    info = fail_info(slurm_cluster, tmp_path)
    assert tasks[seed]["JobState"] == "COMPLETED" and tasks[seed]["ExitCode"] == "0:0", info
    assert tasks[seed]["Restarts"] == "1", info
    assert tasks[0]["JobState"] == "COMPLETED" and tasks[0]["Restarts"] == "0", info

    text = log.read_text()
    assert "restart 0 on 2 tasks" in text and "restart 1 on 2 tasks" in text, text
    assert text.index("restart 0 on") < text.index("exit 3: requeueing") \
        < text.index("restart 1 on"), "log was not appended in order:\n" + text
    first_run = text[:text.index("restart 1 on")]
    assert re.search(r"^iter\s+0\b", first_run, re.M), "first run's lines lost:\n" + text
    assert not re.search(rf"^iter\s+{iters - 1}\b", first_run, re.M), \
        "the signal came too late to interrupt the run:\n" + text
    run_dir = tmp_path / "runs" / f"seed{seed}"
    assert iterations(run_dir).tolist() == list(range(iters))

    ref_dir = tmp_path / "reference"
    ref = subprocess.run(
        ["mpiexec", "-n", "2", sys.executable, "-m", "es_mpi.run", "jobs/quickstart.yaml",
         f"run.seed={seed}", f"run.dir={ref_dir}", *overrides.split()],
        cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=180)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    np.testing.assert_array_equal(final_theta(run_dir), final_theta(ref_dir))
    assert final_theta(run_dir).tobytes() == final_theta(ref_dir).tobytes()


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_plain_srun_without_pmi_is_refused(slurm_cluster, tmp_path: Path) -> None:
    """srun --mpi=none gives 2 one-rank worlds: es_mpi.run must stop before training twice."""
    env = job_env(tmp_path, ES_OVERRIDES=TINY + " run.iterations=4", ES_LAUNCHER="srun",
                  ES_SRUN_MPI="none")
    start = time.monotonic()
    job = submit(slurm_cluster, tmp_path, env, "--ntasks=2", "--array=0")
    rec = by_task(slurm_cluster.wait_done(job, 90))[0]
    elapsed = time.monotonic() - start
    info = fail_info(slurm_cluster, tmp_path)
    assert rec["JobState"] == "FAILED", info
    assert rec["ExitCode"] == f"{EXIT_LAUNCHER_ERROR}:0" and rec["Restarts"] == "0", info
    log = (tmp_path / "humanoid_mlp_0.log").read_text()
    assert "SLURM started 2 tasks" in log and "this MPI world has 1 rank" in log, log
    assert log.count("es_mpi: launcher error") == 1, "the message should be printed once"
    assert not re.search(r"^iter\s", log, re.M) and not (tmp_path / "runs").exists(), log
    assert elapsed < 60, f"took {elapsed:.0f}s to fail"


@pytest.mark.slurm
@pytest.mark.timeout(240)
def test_resubmitting_the_script_continues_each_seed(slurm_cluster, tmp_path: Path) -> None:
    """Run dirs are keyed by seed, not job id: a second `sbatch` of the same script (new array
    job id, longer run) continues both seeds where the first submission left them."""
    def submit_and_wait(iters: int) -> dict[int, dict]:
        env = job_env(tmp_path, ES_OVERRIDES=TINY + f" run.iterations={iters}",
                      ES_LAUNCHER="mpiexec")
        job = submit(slurm_cluster, tmp_path, env, "--ntasks=1", "--array=0-1")
        return by_task(slurm_cluster.wait_done(job, 150))

    first, second = submit_and_wait(3), submit_and_wait(5)
    info = fail_info(slurm_cluster, tmp_path)
    for i in (0, 1):
        for rec in (first[i], second[i]):
            assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", info
        assert first[i]["ArrayJobId"] != second[i]["ArrayJobId"]
        run_dir = tmp_path / "runs" / f"seed{i}"
        assert iterations(run_dir).tolist() == [0, 1, 2, 3, 4], info
        log = (tmp_path / f"humanoid_mlp_{i}.log").read_text()
        assert log.count(f"seed {i} in {run_dir}") == 2, "log not appended:\n" + log
        assert re.search(r"^iter\s+2\b(.|\n)*resuming from(.|\n)*^iter\s+3\b", log, re.M), log
        assert not re.search(r"^iter\s+[0-2]\b", log[log.index("resuming from"):], re.M), \
            "the second submission recomputed finished iterations:\n" + log


def test_run_dir_and_seed_overrides_are_refused(tmp_path) -> None:
    """They come from the array index; a second one would send every task to one run dir."""
    body = REPO / "slurm" / "es_job.sh"
    for extra in ("run.dir=/scratch/x", "run.seed=7"):
        script = (f"source {body}; RUN_DIR={tmp_path}; "
                  f"es_run true run.seed=1 run.dir={tmp_path} {extra}")
        proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "use ES_RUN_ROOT and ES_SEED_BASE" in proc.stdout
    ok = subprocess.run(["bash", "-c", f"source {body}; RUN_DIR={tmp_path}; "
                         f"es_run true run.seed=1 run.dir={tmp_path}"],
                        capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stdout + ok.stderr
