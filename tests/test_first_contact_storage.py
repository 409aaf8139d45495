"""Issue 18, storage: a full disk (real, size-limited tmpfs file systems), the wrong kind of
HDF5 file given to a tool, inspect's outputs checked before any work; and progress inside
a long iteration."""
from __future__ import annotations

import errno
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from _mpirun_persist import ROOT, SMALL, env
from mpi_helpers import mpiexec_path
from test_persist_unit import CONFIG, fake_row, make_state
from es_mpi import inspect
from es_mpi.checkpoint import (CheckpointError, checkpoint_path, list_checkpoints,
                               load_checkpoint, save_checkpoint)
from es_mpi.h5safe import DiskFullError
from es_mpi.launch import EXIT_DISK_FULL
from es_mpi.results import ResultsError, ResultsWriter, read_file, read_results


def _mount(where: Path, *options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(where)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {proc.stderr.strip()}")


@pytest.fixture
def small_fs(tmp_path):
    """mount(size, *options) -> a fresh tmpfs of that size under tmp_path; unmounted after."""
    mounted = []

    def mount(size: str, *options: str) -> Path:
        where = tmp_path / f"fs{len(mounted)}"
        _mount(where, f"size={size}", *options)
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(folder: Path) -> None:
    """Write a filler file until the file system is full."""
    with open(folder / "filler", "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


# ----------------------------------------------------------------------------- disk full
def test_checkpoint_on_a_full_disk_names_file_and_size_and_leaves_no_tmp(small_fs):
    fs = small_fs("256k")
    state = make_state(iteration=3, dim=40_000)  # theta, m and v: 800 kB
    with pytest.raises(DiskFullError) as info:
        save_checkpoint(checkpoint_path(fs, 3), state, CONFIG)
    message = str(info.value)
    print(message)
    assert info.value.errno == errno.ENOSPC
    assert str(checkpoint_path(fs, 3)) in message and "No space left on device" in message
    assert "needs about 0.9 MB" in message and "40,000 parameters" in message
    assert "free there now" in message
    assert sorted(p.name for p in (fs / "checkpoints").iterdir()) == []  # no partial .tmp


def test_results_file_on_a_full_disk(small_fs):
    """A fresh results.h5 that does not fit leaves no results.h5.tmp; an append that does
    not fit is named, and the rows before it stay readable."""
    fs = small_fs("1m")
    fill(fs)
    with pytest.raises(DiskFullError, match=r"cannot write results file .*results\.h5: No "):
        ResultsWriter(fs / "results.h5", config_text=CONFIG)
    assert not list(fs.glob("results.h5*"))
    (fs / "filler").unlink()
    writer = ResultsWriter(fs / "results.h5", config_text=CONFIG)
    writer.append(fake_row(0))
    fill(fs)
    with pytest.raises(DiskFullError, match=r"results\.h5: No space left on device; it needs "
                                            r"about 0.3 MB more to add row 1, 0 kB free"):
        writer.append(fake_row(1))  # found before HDF5 writes (a failed write can crash it)
    writer.close()
    assert list(read_results(fs / "results.h5")["iteration"]) == [0]


def _run(run_dir: Path, hidden: str = "[256,256]", timeout: float = 120):
    cmd = [mpiexec_path(), "-n", "2", sys.executable, "-m", "es_mpi.run",
           str(ROOT / "jobs" / "quickstart.yaml"), f"run.dir={run_dir}", *SMALL,
           "run.iterations=2", f"policy.hidden={hidden}"]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.mpi
@pytest.mark.slow
def test_run_on_a_full_disk_exits_6_on_every_rank_and_resumes(small_fs):
    """The final checkpoint (67K parameters, 1.4 MB) does not fit in 1 MB: named, no .tmp,
    exit 6 without a traceback, inspect does not call the run complete; the same command
    on the full disk again leaves nothing behind either; with room it completes."""
    fs = small_fs("1m")
    run_dir = fs / "run"
    for attempt in range(2):
        proc = _run(run_dir)
        print(proc.stdout[-1500:], proc.stderr[-1500:])
        assert proc.returncode == EXIT_DISK_FULL, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr and "MPI_Abort" not in proc.stderr
        assert f"disk full: cannot write checkpoint {checkpoint_path(run_dir, 2)}" in proc.stderr
        assert "needs about 1.4 MB" in proc.stderr and "start over" in proc.stderr
        assert proc.stderr.count("disk full") == 1  # rank 0 alone says it
        assert not list(run_dir.rglob("*.tmp")) and not list_checkpoints(run_dir)
        cols, _ = read_file(run_dir / "results.h5")
        assert list(cols["iteration"]) == [0, 1]
        run = inspect.load_runs([str(run_dir)])[0]
        assert inspect.summarize(run)["iterations"] == "2/2 (no checkpoint)"
    subprocess.run(["mount", "-o", "remount,size=8m", str(fs)], check=True)
    proc = _run(run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [it for it, _ in list_checkpoints(run_dir)] == [2]
    assert inspect.summarize(inspect.load_runs([str(run_dir)])[0])["iterations"] == "2/2"


@pytest.mark.mpi
def test_preempted_on_a_full_disk_exits_6_on_every_rank(small_fs):
    """The preemption checkpoint does not fit: named, no .tmp, exit 6 (not 3: nothing to
    resume from was written), no traceback."""
    import os
    import signal

    from _mpirun_persist import kill_job, n_rows, rank_pids, start_job, wait_for

    run_dir = small_fs("1m") / "run"
    proc = start_job(2, run_dir, ["run.iterations=500", "run.checkpoint_every=1000",
                                  "policy.hidden=[256,256]"])
    try:
        assert wait_for(lambda: n_rows(run_dir / "results.h5") >= 2, 120, 0.05, proc)
        os.kill(rank_pids(run_dir)[1], signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        kill_job(proc)
    assert proc.returncode == EXIT_DISK_FULL, err[-3000:]
    assert "disk full: cannot write checkpoint" in err and "Preempted after iteration" in err
    assert "Traceback" not in err and "preempted (" not in out
    assert not list(run_dir.rglob("*.tmp")) and not list_checkpoints(run_dir)


# ----------------------------------------------------------------------------- file kinds
@pytest.fixture(scope="module")
def files(tmp_path_factory) -> types.SimpleNamespace:
    """A run directory's two kinds of file (made directly, no run), and a text file."""
    run_dir = tmp_path_factory.mktemp("kinds") / "run"
    ckpt = save_checkpoint(checkpoint_path(run_dir, 2), make_state(iteration=2), CONFIG)
    writer = ResultsWriter(run_dir / "results.h5", config_text=CONFIG)
    for i in range(2):
        writer.append(fake_row(i))
    writer.close()
    (run_dir / "config.yaml").write_text(CONFIG)
    text = run_dir / "README.md"
    text.write_text("# not HDF5\n")
    return types.SimpleNamespace(run=run_dir, ckpt=ckpt, results=run_dir / "results.h5",
                                 text=text)


@pytest.mark.parametrize("guard", [False, True])
def test_a_results_file_read_as_a_checkpoint_says_what_to_pass(files, guard):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(files.results, guard=guard)
    message = str(info.value)
    assert "is an es_mpi results file (results.h5), not a checkpoint" in message
    assert f"the run directory ({files.run})" in message and "checksum" not in message
    with pytest.raises(CheckpointError, match="not an HDF5 file, so not an es_mpi checkpoint"):
        load_checkpoint(files.text, guard=guard)


def test_every_tool_names_a_results_file_given_for_a_checkpoint(files, capsys):
    from es_mpi import evaluate
    from es_mpi.collect import es_mpi_teacher
    from es_mpi.config import ConfigError, load_job
    from es_mpi.init_from import load_initial

    assert evaluate.main([str(files.results)]) == 2
    assert "not a checkpoint: pass a checkpoint" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="teacher: .* results file .*not a checkpoint"):
        es_mpi_teacher(types.SimpleNamespace(teacher=str(files.results)))
    cfg = load_job(str(ROOT / "jobs" / "quickstart.yaml"), [f"run.init_from={files.results}"])
    with pytest.raises(ConfigError, match="run.init_from: .* results file .*not a checkpoint"):
        load_initial(cfg, None, None)


def test_inspect_names_a_checkpoint_and_a_text_file(files, capsys):
    with pytest.raises(ResultsError, match="is an es_mpi checkpoint, not a results file: "
                                           "pass the run directory"):
        read_file(files.ckpt)
    assert inspect.main([str(files.ckpt)]) == 1
    err = capsys.readouterr().err
    assert f"pass the run directory ({files.run}) or its results.h5" in err
    assert "unreadable/damaged" not in err
    assert inspect.main([str(files.text)]) == 1
    err = capsys.readouterr().err
    assert "README.md: not an HDF5 file, so not a results.h5" in err
    assert "unreadable/damaged" not in err


# ----------------------------------------------------------------------------- inspect outputs
def test_inspect_checks_its_outputs_before_any_work(files, small_fs, capsys, tmp_path):
    read_only = small_fs("64k", "ro")
    missing = str(tmp_path / "no-such-run")  # an output error comes before this one
    cases = [(["--plot", str(read_only / "x.png")], "Read-only file system"),
             (["--plot", str(read_only / "new" / "x.png")], "Read-only file system"),
             (["--csv", str(files.text / "x.csv")], "is not a folder"),
             (["--plot", str(tmp_path)], "it is a folder")]
    for flags, why in cases:
        assert inspect.main([missing, *flags]) == 2, flags
        err = capsys.readouterr().err
        assert err.startswith(f"es_mpi: configuration error: {flags[0]}: cannot write "
                              f"{flags[1]}: ")
        assert why in err and "Traceback" not in err
    assert not list(tmp_path.glob(".es_mpi_probe_*")) and not (read_only / "new").exists()
    out = tmp_path / "new" / "rows.csv"  # a missing folder is made when the file is written
    assert inspect.main([str(files.run), "--csv", str(out)]) == 0 and out.is_file()


def test_inspect_plot_without_matplotlib_says_how_to_install(files, monkeypatch, capsys,
                                                            tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    assert inspect.main([str(tmp_path / "no-such-run"), "--plot", str(tmp_path / "x.png")]) == 2
    assert 'pip install -e ".[tools]"' in capsys.readouterr().err


# ----------------------------------------------------------------------------- progress
def test_progress_lines_wait_and_are_rate_limited(capsys, monkeypatch):
    from es_mpi.iteration import PROGRESS_VAR, Progress, progress_seconds

    monkeypatch.delenv(PROGRESS_VAR, raising=False)
    assert progress_seconds() == (10.0, 30.0)  # not a terminal (pytest captures stdout)
    monkeypatch.setenv(PROGRESS_VAR, "0,0.2")
    assert progress_seconds() == (0.0, 0.2)
    quiet = Progress(3, lambda done: (done / 8, f"{done} of 8"), after=10.0, every=0.0)
    for done in range(1, 9):
        quiet.tick(done)
    assert capsys.readouterr().out == ""  # an iteration shorter than `after`: nothing
    loud = Progress(3, lambda done: (done / 8, f"{done} of 8"), after=0.0, every=3600.0)
    for done in range(1, 9):
        loud.tick(done)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("es_mpi: iteration 3 in progress: 1 of 8 (12%), ")
    assert "s left" in lines[0]


def _theta_and_output(run_dir: Path, assignment: str, progress: str | None):
    extra = {"ES_MPI_PROGRESS": progress or ""}  # "": the built-in thresholds
    cmd = [mpiexec_path(), "-n", "2", sys.executable, "-m", "es_mpi.run",
           str(ROOT / "jobs" / "quickstart.yaml"), f"run.dir={run_dir}", *SMALL,
           "run.iterations=2", f"run.assignment={assignment}"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**env(), **extra}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state, _ = load_checkpoint(checkpoint_path(run_dir, 2))
    return state.theta.tobytes(), proc.stdout


def test_progress_estimates_of_both_assignments():
    """In-process, one rank: the static estimate is rank 0's share, the dynamic one the
    counter's chunks (read, not advanced: the items taken afterwards are unchanged)."""
    from es_mpi import comm as mpi
    from es_mpi.iteration import DynamicAssignment, StaticAssignment

    static = StaticAssignment(mpi.world())
    assert static.progress(1, 4, 3) == (3 / 9, "rank 0 has run 3 of its 9 episodes")
    dynamic = DynamicAssignment(mpi.world())
    items = dynamic.items(1, 4)
    taken = [next(items) for _ in range(3)]  # chunks: 1 evaluation episode, then 4, 2, 1, 1
    assert dynamic.progress(1, 4, 3) == (5 / 9, "5 of 9 episodes handed out")
    assert taken + list(items) == list(range(9))
    dynamic.free()


@pytest.mark.mpi
def test_progress_inside_an_iteration_changes_nothing_else(tmp_path):
    """Forced on (ES_MPI_PROGRESS=0,0: a line after every episode of rank 0) the lines
    appear and theta is bitwise the same; by default a short run prints none."""
    plain, out = _theta_and_output(tmp_path / "plain", "dynamic", None)
    assert "in progress" not in out and len(out.splitlines()) == 3  # start line, 2 rows
    forced, out = _theta_and_output(tmp_path / "forced", "dynamic", "0,0")
    lines = [line for line in out.splitlines() if "in progress" in line]
    assert out.count("iter ") == 2  # log readers' count of finished iterations is unchanged
    print("\n".join(lines[:3]))
    assert forced == plain
    for it in (0, 1):
        assert any(line.startswith(f"es_mpi: iteration {it} in progress: ") and
                   "episodes handed out" in line for line in lines)


def test_an_append_that_fails_inside_hdf5_is_named_and_closed_safely(small_fs, monkeypatch):
    """Where free space is not seen beforehand (a quota, another writer), HDF5 itself fails
    the write: the same DiskFullError, the file is closed without crashing the process (a
    plain close after such a failure crashed it), and the committed rows read back."""
    from es_mpi import results

    fs = small_fs("1m")
    monkeypatch.setattr(results, "free_bytes", lambda folder: None)  # no look beforehand
    writer = ResultsWriter(fs / "results.h5", config_text=CONFIG)
    writer.append(fake_row(0))
    fill(fs)
    with pytest.raises(DiskFullError, match=r"results\.h5: No space left on device") as info:
        for i in range(1, 5000):  # the first rows may fit in space HDF5 holds already
            writer.append(fake_row(i))
    writer.close()
    del writer
    import gc
    gc.collect()  # where the crash was
    (fs / "filler").unlink()
    rows = read_results(fs / "results.h5")["iteration"]
    assert len(rows) >= 1 and np.array_equal(rows, np.arange(len(rows))), info.value


def test_every_tool_names_a_full_disk_with_exit_6(small_fs, tmp_path):
    """A tool (es_mpi.convert) writing onto a full file system: one line naming it, exit
    code 6 as es_mpi.run, no traceback, no partial file left."""
    full = small_fs("256k")
    model = ROOT / "tests" / "data" / "es_ff_humanoid_1.model"
    proc = subprocess.run([sys.executable, "-m", "es_mpi.convert", str(model), "--out",
                           str(full / "mlp.h5")], cwd=tmp_path, env=env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == EXIT_DISK_FULL, proc.stderr
    assert proc.stderr.startswith("es_mpi: disk full:") and "Traceback" not in proc.stderr
    assert sorted(p.name for p in full.iterdir()) == []


def test_a_pretrain_partial_checkpoint_is_named_as_such(tmp_path):
    """OUT.partial.h5 of an interrupted es_mpi.pretrain given where a checkpoint or a results
    file is wanted: named, with what to do."""
    import h5py

    from es_mpi.h5safe import PRETRAIN_PARTIAL

    path = tmp_path / "dt.h5.partial.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("theta", data=np.zeros(3, np.float32))
        f.attrs["kind"] = PRETRAIN_PARTIAL
    with pytest.raises(CheckpointError, match="interrupted es_mpi.pretrain's partial"):
        load_checkpoint(path)
    with pytest.raises(ResultsError, match="interrupted es_mpi.pretrain's partial"):
        read_file(path)


def test_a_bad_progress_variable_is_a_configuration_error(monkeypatch):
    from es_mpi.config import ConfigError
    from es_mpi.iteration import progress_seconds

    for bad in ("abc", "10,x", "-1", "inf"):
        monkeypatch.setenv("ES_MPI_PROGRESS", bad)
        with pytest.raises(ConfigError, match="ES_MPI_PROGRESS"):
            progress_seconds()
    monkeypatch.setenv("ES_MPI_PROGRESS", "5")
    assert progress_seconds() == (5.0, 30.0)
