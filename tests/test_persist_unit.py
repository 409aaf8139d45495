"""Checkpoints, results.h5, the documented format and es_mpi.inspect, without MPI."""
from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest

from _mpirun_persist import ROOT, check_doc_agrees, documented, env
from es_mpi import inspect
from es_mpi.checkpoint import (CheckpointError, TrainState, checkpoint_path, content_digest,
                               latest_valid_checkpoint, list_checkpoints, load_checkpoint,
                               prune_checkpoints, save_checkpoint)
from es_mpi.config import load_job
from es_mpi.es import ObsStats, OptimizerState
from es_mpi.results import COLUMNS, ResultsWriter, committed_rows, read_attrs, read_results

CONFIG = "env:\n  id: InvertedPendulum-v5\nrun:\n  seed: 3\n"


def make_state(iteration: int = 7, dim: int = 50, seed: int = 0) -> TrainState:
    rng = np.random.default_rng(seed)
    return TrainState(
        iteration=iteration, theta=rng.standard_normal(dim).astype(np.float32),
        opt=OptimizerState(iteration, rng.standard_normal(dim), rng.standard_normal(dim) ** 2),
        obs_stats=ObsStats(rng.standard_normal(4), rng.random(4) + 1, 123.01),
        prev_lengths=rng.integers(1, 1000, 16), timesteps=98765, episodes=224,
        wall_seconds=12.5, extras={"vbn_ref": rng.standard_normal((3, 4)).astype(np.float32)},
        results=fake_columns(iteration, seed))


def fake_columns(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows 0..n-1 of fake_row as one array per column (what a checkpoint stores)."""
    rows = [fake_row(i, seed) for i in range(n)]
    return {name: np.array([r[name] for r in rows], dtype=dtype)
            for name, (dtype, _, _) in COLUMNS.items()}


def assert_states_equal(a: TrainState, b: TrainState) -> None:
    assert a.iteration == b.iteration and a.timesteps == b.timesteps
    assert a.episodes == b.episodes and a.wall_seconds == b.wall_seconds
    assert a.theta.dtype == b.theta.dtype == np.float32
    assert a.theta.tobytes() == b.theta.tobytes()
    assert a.opt.step == b.opt.step
    assert a.opt.m.tobytes() == b.opt.m.tobytes() and a.opt.v.tobytes() == b.opt.v.tobytes()
    assert a.obs_stats.sum.tobytes() == b.obs_stats.sum.tobytes()
    assert a.obs_stats.sumsq.tobytes() == b.obs_stats.sumsq.tobytes()
    assert a.obs_stats.count == b.obs_stats.count
    assert a.prev_lengths.tobytes() == b.prev_lengths.astype(np.int64).tobytes()
    assert sorted(a.extras) == sorted(b.extras)
    for k in a.extras:
        assert a.extras[k].dtype == b.extras[k].dtype
        assert a.extras[k].tobytes() == b.extras[k].tobytes()
    assert sorted(a.results) == sorted(b.results) == sorted(COLUMNS)
    for k in a.results:
        assert a.results[k].dtype == b.results[k].dtype
        assert a.results[k].tobytes() == b.results[k].tobytes(), k


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_is_bitwise(tmp_path):
    state = make_state()
    path = save_checkpoint(checkpoint_path(tmp_path, 7), state, CONFIG, {"run_seed": 3})
    assert path.name == "ckpt_000007.h5" and not list(path.parent.glob("*.tmp"))
    loaded, text = load_checkpoint(path)
    assert text == CONFIG
    assert_states_equal(loaded, state)
    with h5py.File(path, "r") as f:
        assert f.attrs["checksum"] == content_digest(f)
        assert f["versions"].attrs["numpy"] == np.__version__
        assert f["rng"].attrs["run_seed"] == 3


@pytest.mark.parametrize("damage", ["flip_theta", "flip_extras", "attr", "truncate", "garbage"])
def test_corrupt_checkpoint_is_rejected(tmp_path, damage):
    path = save_checkpoint(checkpoint_path(tmp_path, 4), make_state(4), CONFIG)
    if damage in ("flip_theta", "flip_extras"):
        with h5py.File(path, "r") as f:  # raw byte offset of the (contiguous) dataset
            offset = f["theta" if damage == "flip_theta" else "extras/vbn_ref"].id.get_offset()
        with open(path, "r+b") as fh:
            fh.seek(offset + 5)
            byte = fh.read(1)
            fh.seek(offset + 5)
            fh.write(bytes([byte[0] ^ 0x01]))  # one bit
    elif damage == "attr":
        with h5py.File(path, "a") as f:
            f.attrs["timesteps"] = 1
    elif damage == "truncate":
        os.truncate(path, path.stat().st_size // 2)
    else:
        path.write_bytes(b"not hdf5 at all")
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_latest_valid_falls_back_and_prune_keeps_newest(tmp_path):
    for it in (2, 4, 6, 8):
        save_checkpoint(checkpoint_path(tmp_path, it), make_state(it, seed=it), CONFIG)
    (tmp_path / "checkpoints" / "ckpt_000010.h5.tmp").write_bytes(b"half")
    checkpoint_path(tmp_path, 8).write_bytes(b"\0" * 100)  # newest is corrupt
    warnings: list[str] = []
    state, text, path = latest_valid_checkpoint(tmp_path, warnings.append)
    assert state.iteration == 6 and path == checkpoint_path(tmp_path, 6) and text == CONFIG
    assert len(warnings) == 1 and "ckpt_000008.h5" in warnings[0] and "corrupt" in warnings[0]
    prune_checkpoints(tmp_path, keep=2)
    assert [it for it, _ in list_checkpoints(tmp_path)] == [6, 8]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    assert latest_valid_checkpoint(tmp_path / "nothing", warnings.append) is None


# ----------------------------------------------------------------------------- results.h5
def fake_row(i: int, seed: int = 0) -> dict:
    rng = np.random.default_rng([seed, i])
    row = {name: (int(rng.integers(0, 100)) if dtype == "i8" else float(rng.random()))
           for name, (dtype, _, _) in COLUMNS.items()}
    row.update(iteration=i, timesteps=100 * (i + 1), eval_return=10.0 * i + seed + rng.random(),
               iteration_seconds=0.1 + 0.01 * seed)
    return row


def test_results_round_trip_truncate_and_rebuild(tmp_path):
    path = tmp_path / "results.h5"
    w = ResultsWriter(path, config_text=CONFIG)
    rows = [fake_row(i) for i in range(5)]
    for r in rows:
        w.append(r)
    del rows[4]["fitness_min"]  # a missing column becomes NaN
    w.close()
    cols = read_results(path)
    assert set(cols) == set(COLUMNS)
    np.testing.assert_array_equal(cols["iteration"], np.arange(5))
    np.testing.assert_array_equal(cols["eval_return"], [r["eval_return"] for r in rows])
    assert read_attrs(path)["config"] == CONFIG
    # resume from a checkpoint at iteration 3: rows 3, 4 are dropped, then recomputed
    w = ResultsWriter(path, keep_rows=3, config_text=CONFIG)
    assert len(w) == 3
    w.append(fake_row(3))
    w.close()
    w = ResultsWriter(path, keep_rows=2, config_text=CONFIG)  # an older checkpoint: fewer rows
    w.close()
    cols = read_results(path)
    np.testing.assert_array_equal(cols["timesteps"], [100, 200])
    with h5py.File(path, "r") as f:  # plain h5py, no SWMR, after a clean close
        for ds in f["iterations"].values():
            assert ds.compression == "gzip" and ds.chunks and ds.maxshape == (None,)
            assert ds.dtype.kind in "if"


def test_committed_rows_ignores_a_half_written_row():
    cols = {"iteration": np.array([0, 1, 2, -1]), "eval_return": np.arange(4.0),
            "timesteps": np.arange(5)}
    assert committed_rows(cols) == 3
    assert committed_rows({"iteration": np.arange(6), "x": np.arange(4.0)}) == 4


def test_results_survive_sigkill_of_the_writer(tmp_path):
    """A writer killed mid-run leaves a file SWMR readers can read and a resume can rebuild."""
    path = tmp_path / "results.h5"
    code = (f"import os, signal\nfrom es_mpi.results import ResultsWriter\n"
            f"from test_persist_unit import fake_row\n"
            f"w = ResultsWriter({str(path)!r}, config_text='a: 1')\n"
            f"for i in range(4):\n    w.append(fake_row(i))\n"
            f"os.kill(os.getpid(), signal.SIGKILL)\n")
    e = env()
    e["PYTHONPATH"] = str(ROOT / "tests") + os.pathsep + e["PYTHONPATH"]
    proc = subprocess.run([sys.executable, "-c", code], env=e, cwd=ROOT, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    np.testing.assert_array_equal(read_results(path)["iteration"], np.arange(4))
    with pytest.raises(OSError):  # documented: plain readers need h5clear -s first
        h5py.File(path, "r")
    w = ResultsWriter(path, keep_rows=2, config_text="a: 1")
    w.close()
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["iterations/iteration"][()], [0, 1])


# ----------------------------------------------------------------------------- the public doc
def test_docs_agree_with_results_and_checkpoint_files(tmp_path):
    w = ResultsWriter(tmp_path / "results.h5", config_text=CONFIG)
    w.append(fake_row(0))
    w.close()
    check_doc_agrees(tmp_path / "results.h5", "results.h5")
    save_checkpoint(checkpoint_path(tmp_path, 1), make_state(1), CONFIG,
                    {"scheme": "x", "run_seed": 0, "noise_seed": 1, "noise_table_size": 9})
    check_doc_agrees(checkpoint_path(tmp_path, 1), "Checkpoint")
    doc = documented("results.h5")
    with h5py.File(tmp_path / "results.h5", "r") as f:
        for name, (_, units, _) in COLUMNS.items():
            assert doc[f"iterations/{name}"]["units"] == units == f[f"iterations/{name}"].attrs[
                "units"], name


# ----------------------------------------------------------------------------- inspect
def write_runs(tmp_path, seeds=(0, 1, 2), lengths=(6, 6, 4)) -> list:
    dirs = []
    for seed, n in zip(seeds, lengths):
        d = tmp_path / "exp" / f"seed{seed}"
        d.mkdir(parents=True)
        # explicit values, so the test does not follow retuning of the shipped quickstart
        cfg = load_job(ROOT / "jobs" / "quickstart.yaml", [f"run.seed={seed}", f"run.dir={d}",
                                                          "run.iterations=15", "es.sigma=0.05"])
        w = ResultsWriter(d / "results.h5", config_text=cfg.to_yaml())
        for i in range(n):
            w.append(fake_row(i, seed))
        w.close()
        dirs.append(d)
    return dirs


def test_inspect_table_csv_and_plot(tmp_path, capsys):
    dirs = write_runs(tmp_path)
    png, csv_path = tmp_path / "fig.png", tmp_path / "rows.csv"
    assert inspect.main([str(tmp_path / "exp"), "--plot", str(png), "--csv", str(csv_path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["run", "seed", "iterations", "timesteps", "best_eval",
                                "last_eval", "sec_per_iter"]
    body = [ln.split() for ln in lines[2:5]]
    assert [b[1] for b in body] == ["0", "1", "2"]
    assert [b[2] for b in body] == ["6/15", "6/15", "4/15"]
    best = max(fake_row(i, 2)["eval_return"] for i in range(4))
    assert body[2][4] == f"{best:,.2f}"
    with open(csv_path) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 16 and rows[0]["run"] == str(dirs[0].resolve())
    assert float(rows[-1]["eval_return"]) == fake_row(3, 2)["eval_return"]  # exact (repr)
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    # globs and results files work too, and --csv - writes to stdout
    assert inspect.main([str(tmp_path / "exp" / "seed*"), "--csv", "-"]) == 0
    assert len(list(csv.reader(io.StringIO(capsys.readouterr().out)))) == 17


def test_inspect_median_band_and_groups(tmp_path):
    write_runs(tmp_path)
    runs = inspect.load_runs([str(tmp_path / "exp")])
    x, vals = inspect.stacked(runs, "eval_return")
    assert vals.shape == (3, 6) and np.isnan(vals[2, 4:]).all()
    groups = inspect.group_runs(runs)
    assert list(groups) == ["InvertedPendulum-v5 mlp, 3 seeds"]
    runs[2].config["es.sigma"] = 0.1  # a different setting forms its own group
    labels = list(inspect.group_runs(runs))
    assert labels == ["es.sigma=0.05 (2)", "es.sigma=0.1 (1)"]


def test_inspect_does_not_import_mpi():
    code = ("import sys, es_mpi.inspect, es_mpi.results, es_mpi.checkpoint\n"
            "assert 'mpi4py' not in sys.modules and 'es_mpi.comm' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], env=env(), cwd=ROOT, check=True, timeout=60)


def test_inspect_reports_missing_paths(tmp_path, capsys):
    assert inspect.main([str(tmp_path / "nope")]) == 1
    assert "no such run directory" in capsys.readouterr().err


# ----------------------------------------------------------------------------- run.py helpers
def test_config_differences_ignore_iterations_and_dir():
    from es_mpi.resume import config_differences
    cfg = load_job(ROOT / "jobs" / "quickstart.yaml", ["es.sigma=0.05"])
    saved = load_job(ROOT / "jobs" / "quickstart.yaml",
                     ["es.sigma=0.05", "run.iterations=99", "run.dir=/elsewhere"]).to_yaml()
    assert config_differences(saved, cfg) == []
    changed = load_job(ROOT / "jobs" / "quickstart.yaml", ["es.sigma=0.1"]).to_yaml()
    assert config_differences(changed, cfg) == ["es.sigma: 0.1 -> 0.05"]
    bookkeeping = load_job(ROOT / "jobs" / "quickstart.yaml", [
        "es.sigma=0.05", "run.checkpoint_every=1", "run.keep_checkpoints=9",
        "run.verify_every=0", "run.torch_threads=2"]).to_yaml()
    assert config_differences(bookkeeping, cfg) == []


def test_preemption_flag_only_sets_a_flag():
    from es_mpi.launch import PreemptionFlag
    old = {s: signal.getsignal(s) for s in PreemptionFlag.SIGNALS}
    try:
        for sig in PreemptionFlag.SIGNALS:
            flag = PreemptionFlag().install()
            assert not flag.is_set()
            os.kill(os.getpid(), sig)
            assert flag.is_set() and flag.signum == sig
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@pytest.mark.skipif(shutil.which("h5dump") is None, reason="h5dump (hdf5-tools) not installed")
def test_h5dump_reads_results_and_checkpoints(tmp_path):
    """The files use the HDF5 1.10 format, so the 1.10 command-line tools read them."""
    w = ResultsWriter(tmp_path / "results.h5", config_text=CONFIG)
    for i in range(3):
        w.append(fake_row(i))
    w.close()
    out = subprocess.run(["h5dump", "-d", "iterations/timesteps", str(tmp_path / "results.h5")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "(0): 100, 200, 300" in out.stdout
    path = save_checkpoint(checkpoint_path(tmp_path, 3), make_state(3), CONFIG)
    out = subprocess.run(["h5dump", "-a", "iteration", str(path)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "(0): 3" in out.stdout, out.stdout + out.stderr


def test_format1_resume_over_an_unreadable_results_file_keeps_placeholders(tmp_path):
    """A checkpoint without rows (format 1): the old file is all there is to read."""
    path = tmp_path / "results.h5"
    path.write_bytes(b"garbage, not HDF5")
    warnings: list[str] = []
    w = ResultsWriter(path, keep_rows=3, warn=warnings.append)
    w.append(fake_row(3))  # rows 0..2 are lost, but the run goes on
    w.close()
    assert (tmp_path / "results.h5.unreadable").read_bytes() == b"garbage, not HDF5"
    assert "results.h5 unreadable/damaged" in warnings[0] and str(path) in warnings[0]
    assert "fewer than the 3 iterations" in warnings[1]
    cols = read_results(path)  # lost rows are kept as placeholders: row i is iteration i
    np.testing.assert_array_equal(cols["iteration"], np.arange(4))
    assert np.isnan(cols["eval_return"][:3]).all() and (cols["timesteps"][:3] == -1).all()
    assert cols["eval_return"][3] == fake_row(3)["eval_return"]
