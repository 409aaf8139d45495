"""results.h5: one row per iteration in 1-D datasets under `iterations/` (rank 0 writes)."""
from __future__ import annotations

import errno
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .h5safe import (HDF5_ERRORS, LIVE_READ_ATTEMPTS, NO_WRITER_READ_ATTEMPTS, GuardedReadError,
                     disk_full, file_kind, free_bytes, guard_seconds, guarded_call,
                     is_no_space, not_hdf5, open_read, retries_can_be_bounded)

# name -> (dtype, units, meaning); the public schema of `iterations/` (docs/results-format.md)
COLUMNS: dict[str, tuple[str, str, str]] = {
    "iteration": ("i8", "-", "iteration index t, starting at 0"),
    "timesteps": ("i8", "env steps", "cumulative training env steps (perturbed episodes)"),
    "episodes": ("i8", "episodes", "cumulative training episodes (2 per mirrored pair)"),
    "wall_seconds": ("f8", "s", "cumulative wall-clock seconds of training"),
    "iteration_seconds": ("f8", "s", "wall-clock seconds of this iteration"),
    "time_rollout": ("f8", "s", "seconds this iteration spent in episodes (rank 0)"),
    "time_comm": ("f8", "s", "seconds in collectives, waiting included (rank 0)"),
    "time_update": ("f8", "s", "seconds reconstructing noise and updating theta (rank 0)"),
    "fitness_mean": ("f8", "return", "mean return of the 2N perturbed episodes"),
    "fitness_max": ("f8", "return", "max return of the perturbed episodes"),
    "fitness_min": ("f8", "return", "min return of the perturbed episodes"),
    "fitness_std": ("f8", "return", "standard deviation of the perturbed returns"),
    "eval_return": ("f8", "return", "mean return of theta without noise (NaN if no eval)"),
    "eval_length": ("f8", "steps", "mean length of the evaluation episodes"),
    "episode_length_mean": ("f8", "steps", "mean length of the perturbed episodes"),
    "episode_cap": ("i8", "steps", "step cap applied to perturbed episodes this iteration"),
    "grad_norm": ("f8", "-", "L2 norm of the gradient estimate g"),
    "update_norm": ("f8", "-", "L2 norm of theta_{t+1} - theta_t"),
    "theta_norm": ("f8", "-", "L2 norm of theta_{t+1}"),
    "obs_count": ("f8", "observations", "observations in the normalisation statistics"),
    "rollout_idle": ("f8", "fraction", "idle share of the rollout stage over all ranks: "
                     "1 - mean/max of the ranks' seconds in episodes"),
}
# Columns added after results were first stored in checkpoints (format 2): rows from an older
# checkpoint lack them and get NaN / -1 there, as a run made before they existed.
LATER_COLUMNS = ("rollout_idle",)

# Columns a run has only when its config asks for them (results.h5 and checkpoints alike).
TARGET_ERROR = "target_error_mean"  # es.fitness target_return
_TARGET_ERROR_SPEC = ("f8", "return", "mean |R - R*_j| of the 2N perturbed episodes, R*_j the "
                      "target return of pair j (es.fitness target_return)")
EVAL_TARGET_PREFIX = "eval_return_target_"  # + i, one per es.eval_targets[i]; attribute `target`
_EVAL_TARGET_SPEC = ("f8", "return", "mean return of theta without noise started with "
                     "return-to-go es.eval_targets[i] (attribute target), on the evaluation seeds")


def eval_target_column(i: int) -> str:
    return f"{EVAL_TARGET_PREFIX}{i}"


@dataclass(frozen=True)
class Schema:
    """The columns of one run's results: COLUMNS, then target_error_mean (es.fitness
    target_return) and eval_return_target_0..K-1 (es.eval_targets, K of them)."""

    eval_targets: tuple[float, ...] = ()  # the value of each eval_return_target_<i>
    target_error: bool = False

    @classmethod
    def of_config(cls, cfg) -> "Schema":
        return cls(tuple(float(v) for v in cfg.es.eval_targets),
                   cfg.es.fitness == "target_return")

    @classmethod
    def of_names(cls, names) -> "Schema":
        """The optional columns among `names` (stored rows); target values unknown (NaN).
        eval_return_target_<i> count only as a run 0..K-1, as a writer makes them."""
        k = 0
        while eval_target_column(k) in names:
            k += 1
        return cls((float("nan"),) * k, TARGET_ERROR in names)

    def optional(self) -> dict[str, tuple[str, str, str]]:
        out = {TARGET_ERROR: _TARGET_ERROR_SPEC} if self.target_error else {}
        out.update({eval_target_column(i): _EVAL_TARGET_SPEC for i in range(len(self.eval_targets))})
        return out

    def columns(self) -> dict[str, tuple[str, str, str]]:
        return {**COLUMNS, **self.optional()}

    def attrs(self, name: str) -> dict:
        """Extra attributes of a column's dataset in results.h5 (the target of a per-target one)."""
        if name.startswith(EVAL_TARGET_PREFIX):
            return {"target": np.float64(self.eval_targets[int(name[len(EVAL_TARGET_PREFIX):])])}
        return {}


FORMAT_VERSION = 1
# Wall-clock columns: the only ones that differ between two runs of the same job and seed.
TIMING_COLUMNS = ("wall_seconds", "iteration_seconds", "time_rollout", "time_comm", "time_update",
                  "rollout_idle")
_LIBVER = ("v110", "v110")  # SWMR needs >= 1.10; pinning it keeps HDF5 1.10 tools (h5dump) able


def _fill(dtype: np.dtype):
    return np.nan if np.dtype(dtype).kind == "f" else -1


class ResultsError(OSError):
    """results.h5 cannot be read: truncated, damaged, or not an es_mpi results file."""


def set_aside(path: Path, why: str, warn, suffix: str = ".unreadable") -> Path:
    """Rename a bad results file to `<name><suffix>` (kept for inspection, never read)."""
    aside = path.with_name(path.name + suffix)
    os.replace(path, aside)
    warn(f"es_mpi: WARNING: {why}; moved it aside to {aside}")
    return aside


def _rows_from_old_file(path: Path, keep_rows: int, warn,
                        columns: dict[str, tuple[str, str, str]]) -> dict[str, np.ndarray]:
    """Rows 0..keep_rows-1 read from an existing results.h5, for a checkpoint that does not
    carry them (format 1); rows that cannot be read become placeholders (NaN / -1)."""
    old: dict[str, np.ndarray] = {}
    if keep_rows and path.exists():
        try:
            old = read_results(path, attempts=NO_WRITER_READ_ATTEMPTS, guard=True)
        except ResultsError as exc:
            set_aside(path, str(exc), warn)
    have = len(old.get("iteration", ()))
    if have < keep_rows:
        warn(f"es_mpi: WARNING: {path} holds {have} rows, fewer than the {keep_rows} "
             "iterations being resumed, and the checkpoint predates stored rows; the missing "
             "rows cannot be recovered and are filled with NaN / -1")
    rows = {}
    for name, (dtype, _, _) in columns.items():
        col = np.full(keep_rows, _fill(dtype), dtype=dtype)
        if name in old:
            col[:min(have, keep_rows)] = old[name][:keep_rows]
        rows[name] = col
    rows["iteration"] = np.arange(keep_rows, dtype=np.int64)  # rows stay indexed by t
    return rows


@dataclass(frozen=True)
class IterationRow:
    """One row of results.h5: field for field the columns of COLUMNS (a test keeps them
    equal), then the optional columns of a Schema (as_dict names them)."""

    iteration: int
    timesteps: int
    episodes: int
    wall_seconds: float
    iteration_seconds: float
    time_rollout: float
    time_comm: float
    time_update: float
    fitness_mean: float
    fitness_max: float
    fitness_min: float
    fitness_std: float
    eval_return: float
    eval_length: float
    episode_length_mean: float
    episode_cap: int
    grad_norm: float
    update_norm: float
    theta_norm: float
    obs_count: float
    rollout_idle: float
    # the optional columns (Schema): eval_return_target_<i>, and target_error_mean (or None)
    eval_return_targets: tuple[float, ...] = ()
    target_error_mean: float | None = None

    def as_dict(self) -> dict:
        """Column name -> value, the optional columns included when present."""
        out = {name: getattr(self, name) for name in COLUMNS}
        if self.target_error_mean is not None:
            out[TARGET_ERROR] = self.target_error_mean
        out.update({eval_target_column(i): v for i, v in enumerate(self.eval_return_targets)})
        return out

    def summary(self) -> str:
        """The line rank 0 prints for the iteration."""
        extra = "" if self.target_error_mean is None else \
            f" | target error {self.target_error_mean:8.2f}"
        if self.eval_return_targets:
            extra += " | eval at targets " + " ".join(f"{v:.1f}" for v in self.eval_return_targets)
        return (f"iter {self.iteration:5d} | steps {self.timesteps:>11,d} | "
                f"episodes {self.episodes:>9,d} | fitness mean {self.fitness_mean:9.2f} "
                f"max {self.fitness_max:9.2f} | eval {self.eval_return:9.2f} | "
                f"cap {self.episode_cap:5d} | {self.iteration_seconds:6.2f}s{extra}")


def check_rows(rows: dict[str, np.ndarray], n: int,
               columns: dict[str, tuple[str, str, str]] | None = None) -> dict[str, np.ndarray]:
    """`rows` as one array per column of `columns` (default: COLUMNS and the optional columns
    present in `rows`), each of length n with iteration == 0..n-1. Columns of LATER_COLUMNS,
    and optional columns, missing from the rows are filled with NaN / -1 (older rows, or a
    resume with --force that asks for other columns); columns not in `columns` are dropped."""
    columns = Schema.of_names(rows).columns() if columns is None else columns
    fillable = [name for name in columns if name in LATER_COLUMNS or name not in COLUMNS]
    rows = {**{name: np.full(n, _fill(columns[name][0]), dtype=columns[name][0])
               for name in fillable}, **rows}
    missing = [name for name in columns if name not in rows]
    if missing:
        raise ValueError(f"results rows lack the column(s) {', '.join(missing)}")
    out = {name: np.asarray(rows[name], dtype=dtype) for name, (dtype, _, _) in columns.items()}
    if any(col.shape != (n,) for col in out.values()):
        raise ValueError(f"results rows: expected {n} rows in every column, got "
                         + ", ".join(f"{k} {v.shape}" for k, v in out.items() if v.shape != (n,)))
    if not np.array_equal(out["iteration"], np.arange(n)):
        raise ValueError("results rows: iteration is not 0..n-1")
    return out


class ResultsWriter:
    """Append-only, chunked, gzip-compressed datasets; SWMR so readers can follow a live run.

    Opening always writes a fresh file holding rows 0..keep_rows-1, which a resumed run takes
    from its checkpoint (`rows`, the truth: the damaged or newer old file is never needed);
    only for a checkpoint without rows (format 1) are they read from the old file. An old
    file that does not read is set aside as `results.h5.unreadable` with a warning. Rebuilding,
    rather than reopening, also repairs a file whose writer was killed: HDF5 refuses to reopen
    such a file for writing until its consistency flags are cleared. The writer keeps every
    row in memory too (`rows()`), so each checkpoint can carry them.
    """

    def __init__(self, path: str | Path, keep_rows: int = 0, config_text: str = "",
                 warn=print, rows: dict[str, np.ndarray] | None = None,
                 schema: Schema = Schema()):
        self.path, self.schema = Path(path), schema
        self.columns = schema.columns()  # this run's columns: COLUMNS + the optional ones
        if rows is not None:
            rows = check_rows(rows, keep_rows, self.columns)
            if keep_rows and self.path.exists():
                self._set_aside_if_unreadable(warn)
        else:
            rows = _rows_from_old_file(self.path, keep_rows, warn, self.columns)
        self._rows = {name: list(col) for name, col in rows.items()}
        self.failed = False  # a write failed: the file is left as it is, closed quietly
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self._write_fresh(tmp, rows, config_text, schema)
            self.file = h5py.File(tmp, "a", libver=_LIBVER)
            self.grp = self.file["iterations"]
            # Held open for the writer's life: HDF5 writes a closed dataset's metadata when it
            # is closed, and an error there (a full disk) would only be printed, not raised.
            self._ds = {name: self.grp[name] for name in self.columns}
            self.file.swmr_mode = True  # no attribute may be written after this point
            # Publish only now: a reader never finds the file in its locked, non-SWMR state.
            os.replace(tmp, self.path)
        except BaseException as exc:
            if getattr(self, "file", None) is not None:
                _abandon(self.file)
            tmp.unlink(missing_ok=True)  # never leave a partial file on a full disk
            if is_no_space(exc):
                raise disk_full("results file", self.path, exc, _file_bytes(rows)) from None
            raise

    def _set_aside_if_unreadable(self, warn) -> None:
        try:  # the caller holds run.dir's lock: no writer exists, so no retries are needed
            read_results(self.path, attempts=NO_WRITER_READ_ATTEMPTS, guard=True)
        except ResultsError as exc:
            set_aside(self.path, f"{exc} (rebuilt from the checkpoint, no row is lost)", warn)

    @staticmethod
    def _write_fresh(tmp: Path, rows: dict[str, np.ndarray], config_text: str,
                     schema: Schema) -> None:
        with h5py.File(tmp, "w", libver=_LIBVER) as f:
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["config"] = config_text
            from . import __version__
            f.attrs["es_mpi_version"] = __version__
            grp = f.create_group("iterations")
            for name, (dtype, units, meaning) in schema.columns().items():
                data = rows.get(name, np.zeros(0))
                n = len(data)
                ds = grp.create_dataset(name, shape=(n,), maxshape=(None,), dtype=dtype,
                                        chunks=(1024,), compression="gzip",
                                        fillvalue=_fill(dtype))
                if n:
                    ds[:] = data
                ds.attrs["units"] = units
                ds.attrs["description"] = meaning
                ds.attrs.update(schema.attrs(name))

    def __len__(self) -> int:
        return int(self._ds["iteration"].shape[0])

    def append(self, row: dict | IterationRow) -> None:
        """Add one row, which must have exactly this run's columns (a misspelt or missing one
        is a ValueError naming it, never a silent NaN).

        `iteration` is written last, after a flush of all the other columns: a reader that
        sees iteration[i] == i knows the whole row i is on disk (read_results relies on it).
        """
        row = row.as_dict() if isinstance(row, IterationRow) else row
        if set(row) != set(self.columns):
            raise ValueError("results row: unknown column(s) "
                             f"{sorted(set(row) - set(self.columns))}, missing column(s) "
                             f"{sorted(set(self.columns) - set(row))}")
        n = len(self)
        if row["iteration"] != n:
            raise ValueError(f"results row {row['iteration']} appended as row {n}")
        free = free_bytes(self.path.parent)
        if free is not None and free < _ROOM_BYTES:  # see _ROOM_BYTES: before HDF5 fails
            raise disk_full("results file", self.path, OSError(errno.ENOSPC, ""), _ROOM_BYTES,
                            f" more to add row {n}")
        try:
            for name in self.columns:
                if name != "iteration":
                    self._put(name, n, row[name])
            self.file.flush()
            self._put("iteration", n, row["iteration"])
            self.file.flush()
        except (OSError, RuntimeError) as exc:
            if not is_no_space(exc):
                raise
            self.failed = True  # row n is not committed: readers see rows 0..n-1
            _abandon(self.file)
            raise disk_full("results file", self.path, exc, _ROOM_BYTES,
                            f" more to add row {n}") from None

    def _put(self, name: str, n: int, value) -> None:
        value = np.asarray(value, dtype=self.columns[name][0])  # the very value memory keeps
        ds = self._ds[name]
        ds.resize((n + 1,))
        ds[n] = value
        self._rows[name].append(value[()])

    def rows(self) -> dict[str, np.ndarray]:
        """Every row written so far, one array per column (what a checkpoint stores)."""
        return {name: np.array(self._rows[name], dtype=dtype)
                for name, (dtype, _, _) in self.columns.items()}

    def close(self) -> None:
        if not self.failed:  # else closed already (_abandon)
            self.file.close()


# Room for HDF5's metadata and a new compressed chunk per column (a results file of a few
# rows takes about 25 kB). An append needs this much free space before it starts: a full
# disk is best found before HDF5 fails a write (see _abandon; a quota that statvfs does
# not show is only found there).
_ROOM_BYTES = 256 * 1024


def _file_bytes(rows: dict[str, np.ndarray]) -> int:
    """About the size of a fresh results file holding `rows`."""
    return sum(np.asarray(c).nbytes for c in rows.values()) + _ROOM_BYTES


def _abandon(f: h5py.File) -> None:
    """Close a file whose last write failed for want of space. HDF5 retries the write while
    closing, fails again, and the objects it leaves behind can crash the process later; so
    its descriptor is first pointed at /dev/null, where every write succeeds. What is on disk
    stays as it was: the committed rows read back, and a resume rebuilds the file."""
    try:
        fd = f.id.get_vfd_handle()
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, fd)
        os.close(null)
    except (OSError, RuntimeError, ValueError, TypeError):
        pass  # not the POSIX driver: close as it is
    hook = sys.unraisablehook
    sys.unraisablehook = lambda _: None  # HDF5's complaints while closing: nothing to do
    try:
        f.close()
    except (OSError, RuntimeError):
        pass
    finally:
        sys.unraisablehook = hook


def committed_rows(columns: dict[str, np.ndarray]) -> int:
    """Rows fully written: the leading run of rows with iteration[i] == i, within every column.

    A live or killed writer can leave a last row half-written (some columns extended, the
    `iteration` commit marker still -1); such a row is not counted.
    """
    if "iteration" not in columns:
        return 0
    n = min(len(v) for v in columns.values())
    it = columns["iteration"][:n]
    bad = np.flatnonzero(it != np.arange(n))
    return int(bad[0]) if bad.size else n


def _load(path: str, attempts: int | None, with_attrs: bool) -> tuple[dict, dict]:
    """(columns, root attributes or {}) as stored; HDF5 errors propagate."""
    with open_read(path, swmr=True, attempts=attempts) as f:
        if "iterations" not in f and file_kind(f) == "pretrain_partial":
            raise ResultsError(f"{path} is an interrupted es_mpi.pretrain's partial checkpoint,"
                               " not a results file")
        if "iterations" not in f and file_kind(f) == "checkpoint":
            raise ResultsError(f"{path} is an es_mpi checkpoint, not a results file: pass "
                               f"{_run_dir_of(path)} or its results.h5")
        cols = {}
        for name, ds in f["iterations"].items():
            if not isinstance(ds, h5py.Dataset) or ds.ndim != 1:  # e.g. a broken link: None
                raise KeyError(f"iterations/{name} is not a 1-D dataset")
            cols[name] = ds[()]
        attrs = {k: (v.decode() if isinstance(v, bytes) else v)
                 for k, v in f.attrs.items()} if with_attrs else {}
    return cols, attrs


def _run_dir_of(checkpoint: str | Path) -> str:
    """'the run directory (RUN)' for RUN/checkpoints/ckpt_*.h5, else 'a run directory'."""
    folder = Path(checkpoint).resolve().parent
    return f"the run directory ({folder.parent})" if folder.name == "checkpoints" else \
        "a run directory"


def read_file(path: str | Path, attempts: int = LIVE_READ_ATTEMPTS,
              guard: bool = True) -> tuple[dict, dict]:
    """(committed columns, root attributes) of a results file; ResultsError if it is damaged.

    Opened in SWMR-read mode, so it works on a file being written and on one whose writer was
    killed (a plain open of such a file fails until `h5clear -s` clears its flags). HDF5's
    retries of a bad metadata read are bounded (`attempts`; 1 where no writer can exist),
    and with `guard` the read runs in a child process under a time limit (es_mpi.h5safe),
    so damage becomes ResultsError within seconds instead of a hang or a crash.
    """
    return _read(path, attempts, guard, with_attrs=True)


def _read(path: str | Path, attempts: int, guard: bool, with_attrs: bool) -> tuple[dict, dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such results file")
    guard = guard or not retries_can_be_bounded()
    try:
        if guard:
            cols, attrs = guarded_call(_load, str(path), attempts, with_attrs,
                                       timeout=guard_seconds(path))
        else:
            cols, attrs = _load(str(path), attempts, with_attrs)
    except ResultsError:
        raise
    except HDF5_ERRORS as exc:
        if isinstance(exc, GuardedReadError) and exc.kind == "ResultsError":
            raise ResultsError(str(exc)) from None  # not damage: what _load says of the file
        if not_hdf5(path) and not path.name.endswith(".h5"):
            raise ResultsError(f"{path}: not an HDF5 file, so not a results.h5: pass a run "
                               "directory or its results.h5") from None
        raise ResultsError(f"results.h5 unreadable/damaged: {path}: {exc}") from None
    n = committed_rows(cols)
    return {name: v[:n] for name, v in cols.items()}, attrs


def read_results(path: str | Path, attempts: int = LIVE_READ_ATTEMPTS,
                 guard: bool = False) -> dict[str, np.ndarray]:
    """All `iterations/` columns as arrays of the committed rows; ResultsError if damaged.

    In this process by default (fast enough to poll a live run): the metadata of the
    columns is checksummed in the 1.10 format and the retries are bounded. `guard=True`
    adds `read_file`'s time limit against damage that HDF5 does not detect.
    """
    return _read(path, attempts, guard, with_attrs=False)[0]


def read_attrs(path: str | Path, attempts: int = LIVE_READ_ATTEMPTS) -> dict:
    """Root attributes of a results file (format_version, config, es_mpi_version); always
    guarded: strings live in HDF5's global heap, which has no checksum."""
    return read_file(path, attempts, guard=True)[1]


@dataclass
class ResultsProblem:
    """What is wrong with a results file, found by `results_problem`."""

    message: str
    readable: bool  # the file reads, but disagrees with what the checkpoint says


def results_problem(path: str | Path, n: int, rows: dict | None = None) -> ResultsProblem | None:
    """Why `path` does not hold exactly rows 0..n-1 (equal to `rows` when given), or None.

    For a run whose lock this process holds: no writer can exist, so no read is retried.
    """
    try:
        cols = read_results(path, attempts=NO_WRITER_READ_ATTEMPTS, guard=True)
    except FileNotFoundError:
        return ResultsProblem(f"{path} is missing", readable=False)
    except ResultsError as exc:
        return ResultsProblem(str(exc), readable=False)
    have = len(cols.get("iteration", ()))
    if have != n:
        return ResultsProblem(f"{path} holds {have} rows, the checkpoint {n}", readable=True)
    rows = None if rows is None else check_rows(rows, n)
    for name, want in rows.items() if rows is not None else ():
        if name not in cols and name in LATER_COLUMNS:
            continue  # a file written before the column existed
        if name not in cols or cols[name].tobytes() != want.tobytes():
            return ResultsProblem(f"{path}: column {name!r} differs from the rows stored in "
                                  "the checkpoint", readable=True)
    return None


def repair_results(path: str | Path, n: int, rows: dict | None, config_text: str,
                   warn=print, schema: Schema = Schema()) -> bool:
    """Check results.h5 of a finished run against its checkpoint; rebuild it if it is damaged.

    The bad file is set aside (`.unreadable` if it does not read, `.damaged` if it reads but
    disagrees). Returns True if it was rebuilt. Without stored rows (a format-1 checkpoint)
    a damaged file can only be reported.
    """
    path = Path(path)
    problem = results_problem(path, n, rows)
    if problem is None:
        return False
    if rows is None:
        warn(f"es_mpi: WARNING: {problem.message}; the checkpoint predates stored results "
             "rows, so results.h5 cannot be rebuilt")
        return False
    if path.exists():
        set_aside(path, problem.message, warn, ".damaged" if problem.readable else ".unreadable")
    ResultsWriter(path, keep_rows=n, config_text=config_text, warn=warn, rows=rows,
                  schema=schema).close()
    warn(f"es_mpi: WARNING: rebuilt {path} from the checkpoint ({n} rows)")
    return True
