"""End to end under mpiexec: kill -9 and resume, corrupt checkpoints, SIGTERM preemption, SWMR.

Each test launches tiny quickstart jobs (InvertedPendulum, population 24, 1M-value noise table)
at 2 ranks; most of each run's few seconds is interpreter start-up.
"""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from _mpirun_persist import (ROOT, assert_same_rows, check_doc_agrees, env, kill_job, n_rows,
                             rank_pids, run_job, start_job, theta, wait_for)
from es_mpi.checkpoint import checkpoint_path, list_checkpoints
from es_mpi.results import read_results
from es_mpi.launch import EXIT_CONFIG_ERROR, EXIT_PREEMPTED

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(240)]

POP = "es.population=24"
JOB = [POP, "run.iterations=6", "run.checkpoint_every=3"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """6 iterations straight, never interrupted."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    proc = run_job(2, run_dir, JOB)
    assert proc.returncode == 0, proc.stderr
    return run_dir


def test_reference_files_match_the_documented_format(reference):
    check_doc_agrees(reference / "results.h5", "results.h5")
    check_doc_agrees(checkpoint_path(reference, 6), "Checkpoint")
    assert [it for it, _ in list_checkpoints(reference)] == [3, 6]


def test_kill9_of_the_whole_job_then_resume_is_bitwise_equal(reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = start_job(2, run_dir, JOB)
    try:
        assert wait_for(lambda: checkpoint_path(run_dir, 3).exists(), 120, proc=proc)
        kill_job(proc, signal.SIGKILL)  # every process of the job, mpiexec included
        proc.communicate(timeout=30)
    finally:
        kill_job(proc)
    assert proc.returncode == -signal.SIGKILL
    assert not checkpoint_path(run_dir, 6).exists(), "finished before the kill: test is void"
    rows_at_kill = n_rows(run_dir / "results.h5")
    assert 3 <= rows_at_kill < 6

    again = run_job(2, run_dir, JOB)
    assert again.returncode == 0, again.stderr
    assert "resuming from" in again.stdout and "ckpt_000003.h5" in again.stdout
    assert theta(checkpoint_path(run_dir, 6)).tobytes() == theta(
        checkpoint_path(reference, 6)).tobytes()
    np.testing.assert_array_equal(read_results(run_dir / "results.h5")["iteration"], np.arange(6))
    assert_same_rows(run_dir / "results.h5", reference / "results.h5")

    done = run_job(2, run_dir, JOB)  # complete: exits 0 at once, changes nothing
    assert done.returncode == 0 and "already complete" in done.stdout
    assert n_rows(run_dir / "results.h5") == 6


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(reference, tmp_path):
    run_dir = tmp_path / "run"
    first = run_job(2, run_dir, [POP, "run.iterations=4",
                                 "run.checkpoint_every=2"])
    assert first.returncode == 0, first.stderr
    newest = checkpoint_path(run_dir, 4)
    import h5py
    with h5py.File(newest, "r") as f:
        offset = f["theta"].id.get_offset()
    with open(newest, "r+b") as fh:  # flip one bit of theta
        fh.seek(offset + 17)
        b = fh.read(1)[0]
        fh.seek(offset + 17)
        fh.write(bytes([b ^ 0x10]))

    # resumed at 3 ranks: the rank count is not part of the state (theta is rank-invariant)
    # keep_checkpoints may change on resume; with 1 kept, pruning must not keep the corrupt file
    resumed = run_job(3, run_dir, [POP, "run.iterations=6",
                                   "run.checkpoint_every=2", "run.keep_checkpoints=1"])
    assert resumed.returncode == 0, resumed.stderr
    assert "skipping corrupt checkpoint" in resumed.stderr and "ckpt_000004.h5" in resumed.stderr
    assert "ckpt_000002.h5 (iteration 2)" in resumed.stdout
    assert [it for it, _ in list_checkpoints(run_dir)] == [6]
    assert (run_dir / "checkpoints" / "ckpt_000004.h5.corrupt").exists()
    # rows 2, 3 were recomputed; the result equals the uninterrupted run
    assert theta(checkpoint_path(run_dir, 6)).tobytes() == theta(
        checkpoint_path(reference, 6)).tobytes()
    assert_same_rows(run_dir / "results.h5", reference / "results.h5")


def test_a_second_run_on_a_run_dir_in_use_is_refused(tmp_path):
    import fcntl
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / ".lock", "a+") as held:  # what a running job's rank 0 holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("host elsewhere pid 1 slurm job 42\n")
        held.flush()
        refused = run_job(2, run_dir, [POP, "run.iterations=1"])
    assert refused.returncode == EXIT_CONFIG_ERROR
    assert "is in use by another es_mpi run (host elsewhere pid 1 slurm job 42)" in refused.stderr
    assert not (run_dir / "results.h5").exists() and not (run_dir / "checkpoints").exists()
    again = run_job(2, run_dir, [POP, "run.iterations=1"])  # the lock is free now
    assert again.returncode == 0, again.stderr


def test_resume_with_a_different_config_is_refused_unless_forced(reference, tmp_path):
    import shutil
    run_dir = tmp_path / "copy"
    shutil.copytree(reference, run_dir)  # also: a moved run dir resumes (run.dir is ignored)
    refused = run_job(2, run_dir, JOB[:-1] + ["run.iterations=7", "es.lr=0.01"])
    assert refused.returncode == EXIT_CONFIG_ERROR
    from es_mpi.config import load_job
    job_lr = load_job(ROOT / "jobs/quickstart.yaml").es.lr
    assert f"es.lr: {job_lr!r} -> 0.01" in refused.stderr and "--force" in refused.stderr
    forced = run_job(2, run_dir, JOB[:-1] + ["run.iterations=7", "es.lr=0.01"], ["--force"])
    assert forced.returncode == 0, forced.stderr
    assert "resuming from" in forced.stdout and n_rows(run_dir / "results.h5") == 7


def test_sigterm_to_one_rank_checkpoints_exits_3_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    job = [POP, "run.iterations=200", "run.checkpoint_every=1000"]
    proc = start_job(2, run_dir, job)
    try:
        assert wait_for(lambda: n_rows(run_dir / "results.h5") >= 2, 120, 0.05, proc)
        pids = rank_pids(run_dir)
        assert sorted(pids) == [0, 1], pids
        import os
        os.kill(pids[1], signal.SIGTERM)  # one rank only, not rank 0 (the writer)
        out, err = proc.communicate(timeout=60)
    finally:
        kill_job(proc)
    assert proc.returncode == EXIT_PREEMPTED, err
    assert "preempted (rank 1: SIGTERM)" in out
    (k, ckpt), = list_checkpoints(run_dir)  # only the preemption checkpoint (every=1000)
    assert 2 <= k < 200 and n_rows(run_dir / "results.h5") == k
    resumed = run_job(2, run_dir, job[:1] + [f"run.iterations={k + 2}"] + job[2:])
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {ckpt} (iteration {k})" in resumed.stdout
    np.testing.assert_array_equal(read_results(run_dir / "results.h5")["iteration"],
                                  np.arange(k + 2))


def test_sigusr1_to_mpiexec_is_forwarded_and_preempts(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_job(2, run_dir, [POP, "run.iterations=200",
                                   "run.checkpoint_every=1000"])
    try:
        assert wait_for(lambda: n_rows(run_dir / "results.h5") >= 1, 120, 0.05, proc)
        proc.send_signal(signal.SIGUSR1)  # to mpiexec only: hydra forwards it to the ranks
        out, err = proc.communicate(timeout=60)
    finally:
        kill_job(proc)
    assert proc.returncode == EXIT_PREEMPTED, err
    assert "rank 0: SIGUSR1, rank 1: SIGUSR1" in out
    assert len(list_checkpoints(run_dir)) == 1


BLOCKED = """
import os, signal, sys, threading, time
from es_mpi import comm as mpi
from es_mpi.launch import PreemptionFlag
comm = mpi.world()
flag = PreemptionFlag().install()
if comm.Get_rank() == 1:
    # signal this rank while it sits inside MPI_Barrier waiting for rank 0
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
else:
    time.sleep(2.0)
t0 = time.monotonic()
comm.Barrier()
waited = time.monotonic() - t0
agreed = flag.agreed(comm)
print(f"rank {comm.Get_rank()} waited {waited:.2f} flag {flag.is_set()} agreed {agreed}",
      flush=True)
sys.exit(0 if agreed else 1)
"""


def test_signal_while_blocked_in_mpi_is_seen_at_the_next_boundary():
    proc = subprocess.run(["mpiexec", "-n", "2", sys.executable, "-c", BLOCKED], env=env(),
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rank 0 waited" in proc.stdout and "agreed True" in proc.stdout
    # the launcher may interleave the two ranks' lines: match, do not split
    waited, flag = re.search(r"rank 1 waited ([\d.]+) flag (\w+)", proc.stdout).groups()
    assert flag == "True" and float(waited) > 0.5  # was blocked when hit


def test_swmr_reader_polling_a_live_run_never_errors(tmp_path):
    run_dir = tmp_path / "run"
    results = run_dir / "results.h5"
    # long enough for several polls and the live plot, on a loaded machine too (16 pairs x 12
    # iterations once finished before the reader saw three live row counts)
    iterations = 30
    proc = start_job(2, run_dir, ["es.population=48", f"run.iterations={iterations}"])
    from es_mpi import inspect
    live_plot = tmp_path / "live.png"
    seen, polls, snapshots = [], 0, []
    try:
        deadline = time.monotonic() + 180
        while proc.poll() is None and time.monotonic() < deadline:
            if results.exists():
                cols = read_results(results)  # must never raise, whatever the writer is doing
                n = len(cols["iteration"])
                np.testing.assert_array_equal(cols["iteration"], np.arange(n))
                assert all(len(v) == n for v in cols.values())
                assert not np.isnan(cols["fitness_mean"]).any()
                seen.append(n)
                if n and (not snapshots or snapshots[-1][0] < n):
                    snapshots.append((n, cols))
                if n >= 3 and not live_plot.exists():  # the CLI on the running job
                    assert inspect.main([str(run_dir), "--plot", str(live_plot)]) == 0
                polls += 1
            time.sleep(0.02)
        proc.communicate(timeout=60)
    finally:
        kill_job(proc)
    assert proc.returncode == 0
    assert seen == sorted(seen), "row count went backwards"
    assert len({n for n in seen if 0 < n < iterations}) >= 3, f"too few live observations: {set(seen)}"
    final = read_results(results)
    for n, cols in snapshots:  # committed rows never change afterwards
        for k, v in cols.items():
            assert v.tobytes() == final[k][:n].tobytes(), k
    assert live_plot.exists()
    assert inspect.main([str(run_dir)]) == 0  # and on the finished file
