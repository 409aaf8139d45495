"""results.h5: one row per iteration in 1-D datasets under `iterations/` (rank 0 writes)."""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

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
}


FORMAT_VERSION = 1
# Wall-clock columns: the only ones that differ between two runs of the same job and seed.
TIMING_COLUMNS = ("wall_seconds", "iteration_seconds", "time_rollout", "time_comm", "time_update")
_LIBVER = ("v110", "v110")  # SWMR needs >= 1.10; pinning it keeps HDF5 1.10 tools (h5dump) able


def _fill(dtype: np.dtype):
    return np.nan if np.dtype(dtype).kind == "f" else -1


class ResultsWriter:
    """Append-only, chunked, gzip-compressed datasets; SWMR so readers can follow a live run.

    Opening rebuilds the file from the first `keep_rows` rows of any existing results.h5 (a
    resumed run drops rows computed after its checkpoint and recomputes them). Rebuilding,
    rather than reopening, also repairs a file whose writer was killed: HDF5 refuses to reopen
    such a file for writing until its consistency flags are cleared.
    """

    def __init__(self, path: str | Path, keep_rows: int = 0, config_text: str = "",
                 warn=print):
        self.path = Path(path)
        old = {}
        if keep_rows and self.path.exists():
            try:
                old = read_results(self.path)
            except (OSError, KeyError) as exc:  # not HDF5 / no iterations group: keep it aside
                aside = self.path.with_name(self.path.name + ".unreadable")
                os.replace(self.path, aside)
                warn(f"es_mpi: WARNING: cannot read {self.path} ({exc}); moved it to {aside}")
        have = len(old.get("iteration", ()))
        if have < keep_rows:
            warn(f"es_mpi: WARNING: {self.path} holds {have} rows, fewer than the "
                 f"{keep_rows} iterations being resumed; the missing rows cannot be recovered "
                 "and are filled with NaN / -1")
        rows = {}
        for name, (dtype, _, _) in COLUMNS.items():
            col = np.full(keep_rows, _fill(dtype), dtype=dtype)
            if name in old:
                col[:min(have, keep_rows)] = old[name][:keep_rows]
            rows[name] = col
        rows["iteration"] = np.arange(keep_rows, dtype=np.int64)  # rows stay indexed by t
        tmp = self.path.with_name(self.path.name + ".tmp")
        self._write_fresh(tmp, rows, config_text)
        self.file = h5py.File(tmp, "a", libver=_LIBVER)
        self.grp = self.file["iterations"]
        self.file.swmr_mode = True  # no attribute may be written after this point
        # Publish only now: a reader never finds the file in its locked, non-SWMR state.
        os.replace(tmp, self.path)

    @staticmethod
    def _write_fresh(tmp: Path, rows: dict[str, np.ndarray], config_text: str) -> None:
        with h5py.File(tmp, "w", libver=_LIBVER) as f:
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["config"] = config_text
            from . import __version__
            f.attrs["es_mpi_version"] = __version__
            grp = f.create_group("iterations")
            for name, (dtype, units, meaning) in COLUMNS.items():
                data = rows.get(name, np.zeros(0))
                n = len(data)
                ds = grp.create_dataset(name, shape=(n,), maxshape=(None,), dtype=dtype,
                                        chunks=(1024,), compression="gzip",
                                        fillvalue=_fill(dtype))
                if n:
                    ds[:] = data
                ds.attrs["units"] = units
                ds.attrs["description"] = meaning

    def __len__(self) -> int:
        return int(self.grp["iteration"].shape[0])

    def append(self, row: dict) -> None:
        """Add one row; columns missing from `row` get NaN (floats) or -1 (integers).

        `iteration` is written last, after a flush of all the other columns: a reader that
        sees iteration[i] == i knows the whole row i is on disk (read_results relies on it).
        """
        n = len(self)
        for name in COLUMNS:
            if name != "iteration":
                ds = self.grp[name]
                ds.resize((n + 1,))
                ds[n] = row.get(name, _fill(ds.dtype))
        self.file.flush()
        ds = self.grp["iteration"]
        ds.resize((n + 1,))
        ds[n] = row["iteration"]
        self.file.flush()

    def close(self) -> None:
        self.file.close()


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


def read_results(path: str | Path) -> dict[str, np.ndarray]:
    """All `iterations/` columns as arrays of the committed rows.

    Opened in SWMR-read mode, so it works on a file being written and on one whose writer was
    killed (a plain open of such a file fails until `h5clear -s` clears its flags).
    """
    with h5py.File(path, "r", swmr=True) as f:
        cols = {name: ds[()] for name, ds in f["iterations"].items()}
    n = committed_rows(cols)
    return {name: v[:n] for name, v in cols.items()}


def read_attrs(path: str | Path) -> dict:
    """Root attributes of a results file (format_version, config, es_mpi_version)."""
    with h5py.File(path, "r", swmr=True) as f:
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
