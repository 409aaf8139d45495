"""Fault injection at small scale: kill -9 at seeded random points, truncated and bit-flipped
results.h5 and checkpoints, damaged finished runs, bad run dirs, refused resumes.

Every case asserts what issue 13 asks: no hang (each subprocess has a timeout, and damaged
reads must fail within seconds), a named error or a repair, theta bitwise equal to an
uninterrupted run and every row present exactly once, equal to that run's rows.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from _mpirun_persist import (ROOT, SMALL, assert_same_rows, env, rank_pids, run_job, theta)
from mpi_helpers import mpiexec_path
from es_mpi.checkpoint import checkpoint_path, load_checkpoint
from es_mpi.launch import EXIT_CONFIG_ERROR
from es_mpi.results import read_results

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(240)]

JOB = ["run.iterations=6", "run.checkpoint_every=2"]
ITERATIONS = 6
KILLPOINT = ROOT / "tests" / "mpi_scripts" / "killpoint.py"
DAMAGED_READ_SECONDS = 3.0  # a damaged in-process read fails within this (measured: ~0.3 s)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    proc = run_job(2, run_dir, JOB)
    assert proc.returncode == 0, proc.stderr
    return run_dir


def kill_at(run_dir: Path, where: str, n: int, ranks: int = 2) -> None:
    """Run the job until rank 0 reaches the point, then kill -9 all of it (killpoint.py)."""
    cmd = [mpiexec_path(), "-n", str(ranks), sys.executable, str(KILLPOINT), where, str(n),
           str(ROOT / "jobs" / "quickstart.yaml"), f"run.dir={run_dir}", *SMALL, *JOB]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]
    deadline = time.monotonic() + 10
    while rank_pids(run_dir) and time.monotonic() < deadline:  # no rank survives the kill
        time.sleep(0.05)
    assert not rank_pids(run_dir)


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> Path:
    """A run killed right after appending row 4: checkpoints 2 and 4, results.h5 with 5 rows
    and its "open for writing" flag still set."""
    run_dir = tmp_path_factory.mktemp("killed") / "run"
    kill_at(run_dir, "append", 4)
    assert len(read_results(run_dir / "results.h5")["iteration"]) == 5
    return run_dir


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def stored_rows(ckpt: Path) -> dict[str, np.ndarray]:
    state, _ = load_checkpoint(ckpt)
    return state.results


def assert_recovered(run_dir: Path, reference: Path, resumed_from: int) -> None:
    """theta bitwise equal, rows 0..5 once each and equal to the reference (but wall-clock
    columns), and rows before the resumed checkpoint exactly the ones it stored."""
    assert theta(checkpoint_path(run_dir, ITERATIONS)).tobytes() == theta(
        checkpoint_path(reference, ITERATIONS)).tobytes()
    cols = read_results(run_dir / "results.h5")
    np.testing.assert_array_equal(cols["iteration"], np.arange(ITERATIONS))
    assert_same_rows(run_dir / "results.h5", reference / "results.h5")
    final = stored_rows(checkpoint_path(run_dir, ITERATIONS))
    for name, col in final.items():  # the final checkpoint carries the very same rows
        assert col.tobytes() == cols[name].tobytes(), name
    if resumed_from:  # rows 0..k-1 are the resumed checkpoint's, wall-clock columns included
        for name, col in stored_rows(checkpoint_path(run_dir, resumed_from)).items():
            assert cols[name][:resumed_from].tobytes() == col.tobytes(), name


def resumed_from(proc: subprocess.CompletedProcess) -> int:
    """The iteration a run said it resumed from (0: it started afresh)."""
    m = re.search(r"resuming from \S+ \(iteration (\d+)\)", proc.stdout)
    return int(m.group(1)) if m else 0


def resume(run_dir: Path, ranks: int = 2, timeout: float = 90) -> subprocess.CompletedProcess:
    start = time.monotonic()
    proc = run_job(ranks, run_dir, JOB, timeout=timeout)
    proc.seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def flip_bit(path: Path, bit: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(bit // 8)
        byte = fh.read(1)[0]
        fh.seek(bit // 8)
        fh.write(bytes([byte ^ (1 << (bit % 8))]))


# ----------------------------------------------------------------------------- kill -9
def _draw_points(seed: int) -> list[tuple[str, int]]:
    """Each kind of kill point once, at a seeded random row (append*) or checkpoint (ckpt*)."""
    rng = np.random.default_rng(seed)
    kinds = [["append-mid", "append", "ckpt-tmp", "ckpt"][i] for i in rng.permutation(4)]
    return [(w, int(rng.integers(0, ITERATIONS)) if w.startswith("append")
             else int(rng.choice([2, 4, 6]))) for w in kinds]


RANDOM_POINTS = _draw_points(13)
# the checkpoint a run killed there resumes from (checkpoints every 2 iterations)
EXPECTED_RESUME = {"append-mid": lambda n: 2 * (n // 2), "append": lambda n: 2 * (n // 2),
                   "ckpt-tmp": lambda n: n - 2, "ckpt": lambda n: n}


@pytest.mark.parametrize("where, n", RANDOM_POINTS, ids=[f"{w}-{n}" for w, n in RANDOM_POINTS])
def test_kill9_at_a_random_point_then_resume_is_bitwise_equal(reference, tmp_path, where, n):
    run_dir = tmp_path / "run"
    kill_at(run_dir, where, n)
    proc = resume(run_dir)
    assert resumed_from(proc) == EXPECTED_RESUME[where](n), proc.stdout
    assert_recovered(run_dir, reference, resumed_from(proc))
    assert "WARNING" not in proc.stderr, proc.stderr  # a killed run is no damage


def test_kill9_while_a_resume_rebuilds_results_then_resume_again(reference, killed, tmp_path):
    run_dir = copy_run(killed, tmp_path / "run")
    kill_at(run_dir, "rebuild", 0)  # the old results.h5 is still in place
    resume(run_dir)
    assert_recovered(run_dir, reference, 4)


# ----------------------------------------------------------------------------- issue cases
@pytest.mark.parametrize("size", [0, 3000, 0.5, 0.9])
def test_resume_over_a_truncated_results_file(reference, killed, tmp_path, size):
    """Cases 1-3: was a hang (SWMR retry loop) or a RuntimeError crash loop, and lost rows."""
    run_dir = copy_run(killed, tmp_path / "run")
    results = run_dir / "results.h5"
    os.truncate(results, int(size * results.stat().st_size) if isinstance(size, float) else size)
    proc = resume(run_dir)
    assert "resuming from" in proc.stdout and "ckpt_000004.h5" in proc.stdout
    assert "results.h5 unreadable/damaged" in proc.stderr and str(results) in proc.stderr
    assert (run_dir / "results.h5.unreadable").exists()
    assert_recovered(run_dir, reference, 4)
    again = run_job(1, run_dir, JOB, timeout=90)  # no crash loop: complete, nothing to repair
    assert again.returncode == 0 and "already complete" in again.stdout
    assert "WARNING" not in again.stderr, again.stderr


def test_resume_over_bit_flipped_results_files(reference, killed, tmp_path):
    size = (killed / "results.h5").stat().st_size
    for i, bit in enumerate(np.random.default_rng(7).integers(0, 8 * size, 2)):
        run_dir = copy_run(killed, tmp_path / f"run{i}")
        flip_bit(run_dir / "results.h5", int(bit))
        resume(run_dir, ranks=1 + i % 2)
        assert_recovered(run_dir, reference, 4)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_resume_falls_back_past_a_damaged_newest_checkpoint(reference, killed, tmp_path, damage):
    run_dir = copy_run(killed, tmp_path / "run")
    ckpt = checkpoint_path(run_dir, 4)
    if damage == "truncate":
        os.truncate(ckpt, ckpt.stat().st_size // 3)
    else:
        with h5py.File(ckpt, "r") as f:
            offset = f["results/eval_return"].id.get_offset()
        flip_bit(ckpt, 8 * offset + 3)  # a stored results row: the checksum covers it
    proc = resume(run_dir)
    assert "skipping corrupt checkpoint" in proc.stderr
    assert "ckpt_000002.h5 (iteration 2)" in proc.stdout
    assert_recovered(run_dir, reference, 2)


def as_format_1(ckpt: Path) -> None:
    """Rewrite a checkpoint as format 1 wrote it: no results/ group, checksum to match."""
    from es_mpi.checkpoint import content_digest
    with h5py.File(ckpt, "r+") as f:
        del f["results"]
        f.attrs["format_version"] = 1
        f.attrs["checksum"] = content_digest(f)


def test_a_format_1_checkpoint_still_resumes_reading_rows_from_results_h5(reference, killed,
                                                                         tmp_path):
    run_dir = copy_run(killed, tmp_path / "run")
    as_format_1(checkpoint_path(run_dir, 4))
    state, _ = load_checkpoint(checkpoint_path(run_dir, 4))
    assert state.results is None and state.iteration == 4
    proc = resume(run_dir)
    assert "ckpt_000004.h5 (iteration 4)" in proc.stdout and "WARNING" not in proc.stderr
    assert_recovered(run_dir, reference, 0)  # rows 0..3 came from the intact old file


@pytest.mark.parametrize("damage", ["truncate", "flip_value", "delete"])
def test_a_complete_run_repairs_its_damaged_results_file(reference, tmp_path, damage):
    """Case 4: was exit 0 'already complete' over a broken file."""
    run_dir = copy_run(reference, tmp_path / "run")
    results = run_dir / "results.h5"
    if damage == "truncate":
        os.truncate(results, results.stat().st_size // 2)
    elif damage == "flip_value":  # still reads, but a value is wrong
        with h5py.File(results, "r+") as f:
            f["iterations/fitness_max"][2] += 1.0
    else:
        results.unlink()
    proc = run_job(2, run_dir, JOB, timeout=90)
    assert proc.returncode == 0 and "already complete" in proc.stdout
    assert f"rebuilt {results} from the checkpoint (6 rows)" in proc.stderr
    aside = {"truncate": ".unreadable", "flip_value": ".damaged", "delete": None}[damage]
    if aside:
        assert (run_dir / f"results.h5{aside}").exists()
    ref, got = read_results(reference / "results.h5"), read_results(results)
    for name in ref:  # every column, wall-clock ones included: the checkpoint kept them
        assert got[name].tobytes() == ref[name].tobytes(), name
    from es_mpi import inspect
    assert inspect.main([str(run_dir)]) == 0


def test_inspect_and_evaluate_name_damage_within_seconds(killed, tmp_path):
    """Case 1 for the readers: inspect hung on such a file."""
    results = tmp_path / "results.h5"
    shutil.copy(killed / "results.h5", results)
    os.truncate(results, results.stat().st_size // 2)
    ckpt = tmp_path / "ckpt_000004.h5"
    shutil.copy(checkpoint_path(killed, 4), ckpt)
    os.truncate(ckpt, 3000)
    for module, path, code in (("es_mpi.inspect", results, 1), ("es_mpi.evaluate", ckpt, 2)):
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", module, str(path)], cwd=ROOT, env=env(),
                              capture_output=True, text=True, timeout=60)
        seconds = time.monotonic() - start
        print(f"{module} on a damaged file: exit {proc.returncode} in {seconds:.2f} s")
        assert proc.returncode == code, proc.stderr
        assert "Traceback" not in proc.stderr and str(path) in proc.stderr
        assert ("unreadable/damaged" if code == 1 else "unreadable checkpoint") in proc.stderr
        assert seconds < 15  # interpreter start-up included; the read itself is < 1 s


def _snapshot(run_dir: Path) -> dict[str, tuple]:
    """Name -> (size, mtime_ns, content digest) of everything in run_dir, itself included."""
    out = {".": (run_dir.stat().st_mtime_ns,)}
    for p in sorted(run_dir.rglob("*")):
        st = p.stat()
        digest = hashlib.blake2b(p.read_bytes()).hexdigest() if p.is_file() else ""
        out[str(p.relative_to(run_dir))] = (st.st_size, st.st_mtime_ns, digest)
    return out


@pytest.mark.parametrize("refusal", ["config", "no_valid_checkpoint", "no_lock_file"])
def test_a_refused_resume_modifies_nothing(reference, tmp_path, refusal):
    """Case 7: a refusal rewrote run.dir/.lock."""
    run_dir = copy_run(reference, tmp_path / "run")
    if refusal == "no_valid_checkpoint":
        for _, path in [(0, p) for p in run_dir.glob("checkpoints/*.h5")]:
            path.write_bytes(b"\0" * 64)
    if refusal == "no_lock_file":  # a copy without the dot file
        (run_dir / ".lock").unlink()
    before = _snapshot(run_dir)
    time.sleep(0.01)
    proc = run_job(2, run_dir, JOB[:-1] + ["run.iterations=7", "es.lr=0.01"], timeout=90)
    assert proc.returncode == EXIT_CONFIG_ERROR, proc.stderr
    assert ("none passes its checksum" if refusal == "no_valid_checkpoint"
            else "different configuration") in proc.stderr
    assert _snapshot(run_dir) == before


@pytest.mark.parametrize("kind", ["regular_file", "below_a_file", "proc", "unwritable"])
def test_run_dir_problems_are_named_errors_before_any_collective(tmp_path, kind):
    """Case 5: was a raw FileExistsError/FileNotFoundError traceback, MPI_Abort, exit 1."""
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me\n")
    if kind == "unwritable":
        if os.geteuid() == 0:
            pytest.skip("root writes anywhere; covered by test_check_run_dir_read_only")
        (tmp_path / "ro").mkdir(mode=0o555)
    run_dir = {"regular_file": a_file, "below_a_file": a_file / "run", "proc": Path("/proc/x"),
               "unwritable": tmp_path / "ro" / "run"}[kind]
    start = time.monotonic()
    proc = run_job(2, run_dir, JOB, timeout=60)
    seconds = time.monotonic() - start
    print(f"run.dir {kind}: exit {proc.returncode} in {seconds:.2f} s")
    assert proc.returncode == EXIT_CONFIG_ERROR, proc.stderr
    assert "configuration error: run.dir:" in proc.stderr and str(run_dir) in proc.stderr
    assert "Traceback" not in proc.stderr and "Abort" not in proc.stderr
    assert proc.stderr.count("configuration error") == 1
    assert a_file.read_text() == "keep me\n" and sorted(os.listdir(tmp_path)) in (
        ["a_file"], ["a_file", "ro"])
    assert seconds < 10  # before torch and the environment: measured ~2 s


def test_check_run_dir_read_only(tmp_path, monkeypatch):
    """A read-only file system (statvfs ST_RDONLY) or a directory this user may not write is a
    named error, and nothing is made."""
    from es_mpi.config import ConfigError
    from es_mpi.resume import check_run_dir

    real = os.statvfs

    class ReadOnly:
        def __init__(self, path):
            self.f_flag = real(path).f_flag | os.ST_RDONLY

    monkeypatch.setattr(os, "statvfs", ReadOnly)
    with pytest.raises(ConfigError, match="read-only file system"):
        check_run_dir(tmp_path / "new" / "run")
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    check_run_dir(tmp_path / "new" / "run")  # fine, and still nothing made
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # what a non-root user sees
    with pytest.raises(ConfigError, match="is not writable by this user"):
        check_run_dir(tmp_path)


# ----------------------------------------------------------------------------- sweeps
SWEEP_GUARD_SECONDS = 3.0  # the guard's time limit inside the sweeps (10 s in real use)


def _damaged_copies(src: Path, seed: int, truncations: int, flips: int):
    """(kind, where, copy) for truncated and bit-flipped copies of src (seeded)."""
    size, rng = src.stat().st_size, np.random.default_rng(seed)
    cases = [("truncate", int(s)) for s in [0, 64, 3000, *np.linspace(0, size, truncations)[1:-1]]]
    cases += [("flip", int(b)) for b in rng.integers(0, 8 * size, flips)]
    for i, (kind, where) in enumerate(cases):
        copy = src.with_name(f"case{i}{src.suffix}")
        shutil.copy(src, copy)
        os.truncate(copy, where) if kind == "truncate" else flip_bit(copy, where)
        yield kind, where, copy


def sweep_results(path: str, stored: str) -> None:
    """Truncated and bit-flipped copies of a results.h5: each guarded read ends within its time
    limit in rows or a ResultsError, the in-process column read within a second, and a
    rebuild from the checkpoint `stored` gives its rows back exactly. Runs in a child
    process (`run_sweep`), so that even a hang would only fail the test."""
    from es_mpi import h5safe
    from es_mpi.results import COLUMNS, ResultsError, ResultsWriter, read_file

    h5safe.GUARD_SECONDS = SWEEP_GUARD_SECONDS
    rows, worst, failed, cut = stored_rows(Path(stored)), {"guarded": 0.0, "columns": 0.0}, 0, 0
    for kind, where, copy in _damaged_copies(Path(path), 3, 7, 8):
        for how, read in (("guarded", read_file), ("columns", read_results)):
            start = time.monotonic()
            try:
                cols = read(copy)
                cols = cols[0] if how == "guarded" else cols
                assert np.array_equal(cols["iteration"], np.arange(len(cols["iteration"])))
            except ResultsError as exc:
                failed += how == "guarded"
                cut += "no answer within" in str(exc)
            worst[how] = max(worst[how], time.monotonic() - start)
        assert worst["columns"] < DAMAGED_READ_SECONDS, f"{kind} {where}: {worst}"
        assert worst["guarded"] < SWEEP_GUARD_SECONDS + 2, f"{kind} {where}: {worst}"
        ResultsWriter(copy, keep_rows=len(rows["iteration"]), rows=rows,
                      warn=lambda m: None).close()
        got = read_results(copy)
        assert all(got[k].tobytes() == v.tobytes() for k, v in rows.items()), (kind, where)
    print(f"results.h5: 16 damaged copies, {failed} unreadable ({cut} cut off by the time "
          f"limit), slowest guarded read {worst['guarded']:.2f} s, slowest column read "
          f"{worst['columns']:.2f} s")


def sweep_checkpoint(path: str) -> None:
    """Truncated and bit-flipped copies of a checkpoint: CheckpointError within the time limit,
    or exactly the same state."""
    from es_mpi import h5safe
    from es_mpi.checkpoint import CheckpointError

    h5safe.GUARD_SECONDS = SWEEP_GUARD_SECONDS
    good, _ = load_checkpoint(Path(path))
    worst, rejected, n = 0.0, 0, 0
    for kind, where, copy in _damaged_copies(Path(path), 4, 10, 30):
        start, n = time.monotonic(), n + 1
        try:
            state, _ = load_checkpoint(copy, guard=True)
            assert state.theta.tobytes() == good.theta.tobytes(), (kind, where)
            assert all(state.results[k].tobytes() == v.tobytes()
                       for k, v in good.results.items()), (kind, where)
        except CheckpointError:
            rejected += 1
        worst = max(worst, time.monotonic() - start)
        assert worst < SWEEP_GUARD_SECONDS + 2, f"{kind} {where}: load took {worst:.2f} s"
    assert rejected >= n // 2
    print(f"checkpoint: {n} damaged copies, {rejected} rejected, slowest load {worst:.2f} s")


def run_sweep(call: str) -> str:
    code = f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); import test_faults; {call}"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout)
    return proc.stdout


@pytest.mark.parametrize("which", ["killed", "closed"])
def test_damaged_results_files_never_hang_and_rebuild_exactly(killed, reference, tmp_path,
                                                              which):
    src = tmp_path / "results.h5"
    shutil.copy((killed if which == "killed" else reference) / "results.h5", src)
    ckpt = checkpoint_path(killed, 4) if which == "killed" else checkpoint_path(reference, 6)
    assert "unreadable" in run_sweep(f"test_faults.sweep_results({str(src)!r}, {str(ckpt)!r})")


def test_damaged_checkpoints_are_rejected_or_identical(reference, tmp_path):
    src = tmp_path / "ckpt_000006.h5"
    shutil.copy(checkpoint_path(reference, 6), src)
    run_sweep(f"test_faults.sweep_checkpoint({str(src)!r})")


def corrupt_global_heap(path: Path, text: bytes) -> None:
    """Give the global-heap object holding `text` a wrong length (the heap has no checksum):
    HDF5 then loops for ever reading the attribute (seen with HDF5 2.0)."""
    data = bytearray(path.read_bytes())
    at = data.index(len(text).to_bytes(8, "little") + text)  # the object's size, its bytes
    data[at] |= 0x80
    path.write_bytes(bytes(data))


def test_a_read_hdf5_cannot_finish_is_cut_off_by_the_time_limit(reference, tmp_path,
                                                                monkeypatch):
    from es_mpi import h5safe, inspect
    from es_mpi.checkpoint import CheckpointError
    from es_mpi.results import COLUMNS, ResultsError, ResultsWriter, read_file

    monkeypatch.setattr(h5safe, "GUARD_SECONDS", 2.0)
    results = tmp_path / "results.h5"
    shutil.copy(reference / "results.h5", results)
    # the description of the next-to-last column: damage to one of the heap's last objects
    # makes HDF5 loop (to earlier ones it answers with an error)
    name, (_, _, description) = list(COLUMNS.items())[-2]
    corrupt_global_heap(results, description.encode())
    start = time.monotonic()
    with pytest.raises(ResultsError, match="no answer within 2 s"):
        read_file(results)
    seconds = time.monotonic() - start
    assert 2.0 <= seconds < 5
    assert len(read_results(results)["iteration"]) == ITERATIONS  # columns never touch it
    assert inspect.main([str(results)]) == 1
    rows = stored_rows(checkpoint_path(reference, ITERATIONS))
    warnings: list[str] = []
    ResultsWriter(results, keep_rows=ITERATIONS, rows=rows, warn=warnings.append).close()
    assert read_file(results)[0][name].tobytes() == rows[name].tobytes()
    ckpt = tmp_path / "ckpt_000006.h5"
    shutil.copy(checkpoint_path(reference, ITERATIONS), ckpt)
    corrupt_global_heap(ckpt, b"blake2b-256 over sorted (path, dtype, shape, bytes) of "
                              b"datasets and attrs")
    with pytest.raises(CheckpointError, match="no answer within 2 s"):
        load_checkpoint(ckpt, guard=True)
    print(f"global-heap damage: guarded read cut off after {seconds:.2f} s (limit 2 s)")


def test_without_a_reader_process_or_the_retry_bound_reads_stay_safe(killed, tmp_path,
                                                                    monkeypatch, capsys):
    """Fallbacks: no child process can start -> read here (bounded retries, a warning);
    retries cannot be bounded -> every read goes through the child's time limit."""
    from es_mpi import h5safe
    from es_mpi.results import ResultsError, read_file

    assert h5safe.retries_can_be_bounded()  # the normal path is the one the suite runs
    good = read_results(killed / "results.h5")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))
    cols, attrs = read_file(killed / "results.h5")
    assert "reading in this process" in capsys.readouterr().err
    assert cols["timesteps"].tobytes() == good["timesteps"].tobytes() and "config" in attrs
    monkeypatch.undo()
    monkeypatch.setattr(h5safe, "_lib", None)
    bad = tmp_path / "results.h5"
    shutil.copy(killed / "results.h5", bad)
    os.truncate(bad, bad.stat().st_size // 2)  # hangs an SWMR read with unbounded retries
    start = time.monotonic()
    with pytest.raises(ResultsError, match="unreadable/damaged"):
        read_results(bad)  # in the child (which can bound them itself): fails fast
    assert time.monotonic() - start < 15
