"""results.h5: one row per iteration in 1-D datasets under `iterations/` (rank 0 writes)."""
from __future__ import annotations

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


class ResultsWriter:
    """Append-only, chunked, gzip-compressed datasets; SWMR so readers can follow a live run."""

    def __init__(self, path: str | Path):
        path = Path(path)
        new = not path.exists()
        self.file = h5py.File(path, "a", libver="latest")
        if new or "iterations" not in self.file:
            grp = self.file.require_group("iterations")
            for name, (dtype, units, meaning) in COLUMNS.items():
                ds = grp.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype,
                                        chunks=(1024,), compression="gzip")
                ds.attrs["units"] = units
                ds.attrs["description"] = meaning
        self.grp = self.file["iterations"]
        self.file.swmr_mode = True

    def __len__(self) -> int:
        return int(self.grp["iteration"].shape[0])

    def truncate(self, n_rows: int) -> None:
        """Drop rows beyond `n_rows` (rows written after the checkpoint being resumed)."""
        for name in COLUMNS:
            self.grp[name].resize((n_rows,))
        self.file.flush()

    def append(self, row: dict) -> None:
        n = len(self)
        for name in COLUMNS:
            ds = self.grp[name]
            ds.resize((n + 1,))
            ds[n] = row.get(name, np.nan if ds.dtype.kind == "f" else -1)
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_results(path: str | Path) -> dict[str, np.ndarray]:
    """All `iterations/` columns as arrays (works on a file being written in SWMR mode)."""
    with h5py.File(path, "r", libver="latest", swmr=True) as f:
        return {name: ds[()] for name, ds in f["iterations"].items()}
