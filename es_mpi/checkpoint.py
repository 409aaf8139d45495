"""Checkpoints: HDF5 files with `theta` and everything needed to resume (rank 0 writes)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from .es import ObsStats, OptimizerState


@dataclass
class TrainState:
    """Everything that evolves across iterations; identical on every rank."""

    iteration: int  # iterations completed (the next one to run)
    theta: np.ndarray  # (dim,) float32
    opt: OptimizerState
    obs_stats: ObsStats
    prev_lengths: np.ndarray  # (2N,) episode lengths of the last iteration (adaptive cap)
    timesteps: int = 0
    episodes: int = 0
    wall_seconds: float = 0.0
    # Arrays that other parts need restored bitwise (e.g. a VBN reference batch), saved under
    # the checkpoint group `extras/` by name.
    extras: dict[str, np.ndarray] = field(default_factory=dict)


def checkpoint_path(run_dir: str | Path, iteration: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"ckpt_{iteration:06d}.h5"


def save_checkpoint(path: str | Path, state: TrainState, config_text: str) -> Path:
    """Write to a temporary file, flush, fsync, then rename: never a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".h5.tmp")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("theta", data=state.theta.astype(np.float32))
        f.attrs["iteration"] = state.iteration
        f.attrs["timesteps"] = state.timesteps
        f.attrs["episodes"] = state.episodes
        f.attrs["wall_seconds"] = state.wall_seconds
        f.attrs["config"] = config_text
        opt = f.create_group("optimizer")
        opt.attrs["step"] = state.opt.step
        opt.create_dataset("m", data=state.opt.m)
        opt.create_dataset("v", data=state.opt.v)
        obs = f.create_group("obs_stats")
        obs.create_dataset("sum", data=state.obs_stats.sum)
        obs.create_dataset("sumsq", data=state.obs_stats.sumsq)
        obs.attrs["count"] = state.obs_stats.count
        f.create_dataset("prev_lengths", data=state.prev_lengths.astype(np.int64))
        extras = f.create_group("extras")
        for name, value in state.extras.items():
            extras.create_dataset(name, data=value)
        f.flush()
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path) -> tuple[TrainState, str]:
    """Read a checkpoint back: (state, resolved config text)."""
    with h5py.File(path, "r") as f:
        opt, obs = f["optimizer"], f["obs_stats"]
        state = TrainState(
            iteration=int(f.attrs["iteration"]),
            theta=f["theta"][()],
            opt=OptimizerState(int(opt.attrs["step"]), opt["m"][()], opt["v"][()]),
            obs_stats=ObsStats(obs["sum"][()], obs["sumsq"][()], float(obs.attrs["count"])),
            prev_lengths=f["prev_lengths"][()],
            timesteps=int(f.attrs["timesteps"]),
            episodes=int(f.attrs["episodes"]),
            wall_seconds=float(f.attrs["wall_seconds"]),
            extras={name: ds[()] for name, ds in f["extras"].items()},
        )
        return state, str(f.attrs["config"])
