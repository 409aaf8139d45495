"""Helpers for the persistence tests: launch `mpiexec -n K python -m es_mpi.run`, find rank
processes, and compare run directories. (Local to tests/test_persist_*.py.)"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
from mpi_helpers import child_env, mpiexec_path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "results-format.md"
# quickstart, shrunk: a few seconds per run, most of it interpreter start-up.
SMALL = ["es.population=8", "es.noise_table_size=1000000", "es.eval_episodes=1"]


env = child_env


def command(n: int, run_dir: Path, overrides: list[str], extra: list[str] = ()) -> list[str]:
    return [mpiexec_path(), "-n", str(n), sys.executable, "-m", "es_mpi.run",
            str(ROOT / "jobs" / "quickstart.yaml"), f"run.dir={run_dir}", *SMALL, *overrides,
            *extra]


def run_job(n: int, run_dir: Path, overrides: list[str], extra: list[str] = (),
            timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(command(n, run_dir, overrides, extra), cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=timeout)


def start_job(n: int, run_dir: Path, overrides: list[str]) -> subprocess.Popen:
    """Launch in its own process group so the test can kill the whole job at once."""
    return subprocess.Popen(command(n, run_dir, overrides), cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def kill_job(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def wait_for(predicate, timeout: float, interval: float = 0.01, proc=None) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return bool(predicate())
        time.sleep(interval)
    return False


def rank_pids(run_dir: Path) -> dict[int, int]:
    """{rank: pid} of the python ranks whose command line names run_dir (via /proc)."""
    out = {}
    needle = f"run.dir={run_dir}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            if b"es_mpi.run" not in cmd or needle not in cmd or b"mpiexec" in cmd[0]:
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for var in environ:
            m = re.match(rb"PMI_RANK=(\d+)$", var)
            if m:
                out[int(m.group(1))] = int(entry.name)
    return out


def n_rows(results: Path) -> int:
    from es_mpi.results import read_results
    try:
        return len(read_results(results)["iteration"])
    except (OSError, KeyError):
        return 0


def theta(ckpt: Path) -> np.ndarray:
    with h5py.File(ckpt, "r") as f:
        return f["theta"][()]


def deterministic_columns(results: Path) -> dict[str, np.ndarray]:
    """Every results column except the wall-clock ones (those differ between any two runs)."""
    from es_mpi.results import TIMING_COLUMNS, read_results
    return {k: v for k, v in read_results(results).items() if k not in TIMING_COLUMNS}


def assert_same_rows(a: Path, b: Path) -> None:
    ca, cb = deterministic_columns(a), deterministic_columns(b)
    assert sorted(ca) == sorted(cb)
    for k in ca:
        assert ca[k].dtype == cb[k].dtype and ca[k].shape == cb[k].shape, k
        assert ca[k].tobytes() == cb[k].tobytes(), f"column {k} differs: {ca[k]} vs {cb[k]}"


# ----------------------------------------------------------------------------- docs vs files
def documented(section: str) -> dict[str, dict]:
    """Rows of the tables under '## <section>' in docs/results-format.md, keyed by name."""
    text = DOC.read_text()
    start = text.index("\n## " + section)
    end = text.find("\n## ", start + 1)
    rows = {}
    for line in text[start: end if end > 0 else None].splitlines():
        m = re.match(r"^\| `([^`]+)` \| (\w+) \| ([^|]*) \| ([^|]*) \| ([^|]*) \| (.*)\|$",
                     line)
        if m:
            rows[m.group(1)] = dict(kind=m.group(2), shape=m.group(3).strip(),
                                    dtype=m.group(4).strip(), units=m.group(5).strip(),
                                    optional=m.group(6).strip().startswith("only with"))
    return rows


def file_names(path: Path) -> dict[str, tuple[str, object]]:
    """{name: (kind, object)} for every group, dataset and attribute, in the doc's notation."""
    names: dict[str, tuple[str, object]] = {}
    with h5py.File(path, "r", swmr=True) as f:
        for key in f.attrs:
            names["@" + key] = ("attribute", f.attrs[key])

        def visit(name, obj):
            kind = "dataset" if isinstance(obj, h5py.Dataset) else "group"
            names[name] = (kind, (obj.dtype, obj.compression) if kind == "dataset" else None)
            for key in obj.attrs:
                names[f"{name}@{key}"] = ("attribute", obj.attrs[key])

        f.visititems(visit)
    return names


def _pattern(doc_name: str) -> re.Pattern:
    parts = re.split(r"(<[^>]+>)", doc_name)
    return re.compile("^" + "".join("[^/@]+" if p.startswith("<") else re.escape(p)
                                    for p in parts) + "$")


def check_doc_agrees(path: Path, section: str) -> None:
    """Every name in the file is documented (with its kind and dtype), and vice versa."""
    doc = documented(section)
    files = file_names(path)
    patterns = {d: _pattern(d) for d in doc}
    for name, (kind, info) in files.items():
        hits = [d for d, p in patterns.items() if p.match(name)]
        assert hits, f"{path.name}: {name!r} is written but not documented in {DOC.name}"
        row = doc[hits[0]]
        assert row["kind"] == kind, f"{name}: documented as {row['kind']}, is a {kind}"
        if kind == "dataset":
            dtype, compression = info
            assert compression in (None, "gzip"), f"{name}: compression {compression}"
            assert dtype.kind != "O", f"{name}: object dtype"
            if row["dtype"] != "any":
                assert np.dtype(row["dtype"]) == dtype, f"{name}: {dtype} vs doc {row['dtype']}"
    for d, p in patterns.items():
        if "<" in d or doc[d]["optional"]:  # patterns, and names only some runs write
            continue
        assert any(p.match(n) for n in files), f"{d!r} is documented but not in {path.name}"
