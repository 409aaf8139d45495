"""Checkpoints: HDF5 files with `theta` and everything needed to resume bitwise (rank 0 writes).

A checkpoint is written to a temporary file, flushed, fsynced and renamed, and carries a
blake2b checksum over every dataset and attribute it holds, so a torn or bit-rotted file is
recognised on load and skipped in favour of an older one. The layout is public:
docs/results-format.md.
"""
from __future__ import annotations

import hashlib
import os
import platform
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from .es import ObsStats, OptimizerState
from .h5safe import (HDF5_ERRORS, GuardedReadError, disk_full, file_kind, guard_seconds,
                     guarded_call, is_no_space, not_hdf5)
from .results import check_rows

# 2: adds the group `results/` (the results.h5 rows 0..iteration-1); format 1 loads too.
FORMAT_VERSION = 2
CHECKSUM_ALGORITHM = "blake2b-256 over sorted (path, dtype, shape, bytes) of datasets and attrs"
_CKPT_RE = re.compile(r"^ckpt_(\d{6,})\.h5$")
# Libraries whose version is recorded in every checkpoint (read from package metadata, so
# mpi4py is never imported here).
_VERSIONED = ("es_mpi", "numpy", "h5py", "torch", "gymnasium", "mujoco", "ale-py", "mpi4py",
              "pyyaml")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: unreadable, incomplete, or its checksum does not match."""


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
    # The results.h5 rows 0..iteration-1 (one array per column), saved under `results/`: a
    # resumed run rebuilds results.h5 from them. Rank 0's ResultsWriter holds them during a
    # run (the loop does not carry them); None when loaded from a format-1 checkpoint.
    results: dict[str, np.ndarray] | None = None


def checkpoint_path(run_dir: str | Path, iteration: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"ckpt_{iteration:06d}.h5"


def library_versions() -> dict[str, str]:
    """Versions of Python, HDF5 and the libraries that shape the numbers (for provenance)."""
    out = {"python": platform.python_version(), "hdf5": h5py.version.hdf5_version}
    for name in _VERSIONED:
        try:
            out[name.replace("-", "_")] = metadata.version(name)
        except metadata.PackageNotFoundError:
            if name == "es_mpi":  # run from a source tree, not installed
                from . import __version__
                out[name] = __version__
            else:
                out[name.replace("-", "_")] = "not installed"
    return out


def _attr_bytes(value) -> bytes:
    if isinstance(value, str):
        return b"str:" + value.encode("utf-8")
    if isinstance(value, bytes):
        return b"bytes:" + value
    arr = np.asarray(value)
    return arr.dtype.str.encode() + str(arr.shape).encode() + arr.tobytes()


def content_digest(f: h5py.File) -> str:
    """blake2b over every dataset and attribute (except the root `checksum` itself).

    Objects are visited in sorted path order and each contributes its path, dtype, shape and
    raw bytes, so the digest depends on the content only, not on HDF5's on-disk layout.
    """
    items: list[tuple[str, bytes]] = []

    def add_attrs(path: str, obj) -> None:
        for key in sorted(obj.attrs):
            if path == "/" and key == "checksum":
                continue
            items.append((f"{path}@{key}", _attr_bytes(obj.attrs[key])))

    add_attrs("/", f)

    def visit(name: str, obj) -> None:
        add_attrs("/" + name, obj)
        if isinstance(obj, h5py.Dataset):
            data = np.ascontiguousarray(obj[()])
            items.append(("/" + name, data.dtype.str.encode() + str(data.shape).encode()
                          + data.tobytes()))
        else:
            items.append(("/" + name, b"group"))

    f.visititems(visit)
    h = hashlib.blake2b(digest_size=32)
    for path, blob in sorted(items):
        h.update(path.encode() + b"\0" + len(blob).to_bytes(8, "little") + blob)
    return h.hexdigest()


def save_checkpoint(path: str | Path, state: TrainState, config_text: str,
                    rng: dict | None = None, extra_group: tuple[str, dict, dict] | None = None
                    ) -> Path:
    """Write to a temporary file, flush, fsync, then rename: never a half-written checkpoint.

    `rng` (optional) records how randomness is derived (seeds), for readers; resuming needs
    no generator state because every draw is a function of (run.seed, iteration, j).
    `state.results` must hold the results rows 0..iteration-1 (ValueError otherwise).
    `extra_group` (name, datasets, attributes): one more group, covered by the checksum and
    ignored by readers of checkpoints (es_mpi.pretrain's `pretrain/`).
    """
    if state.results is None:
        raise ValueError("save_checkpoint: state.results (the results rows) is required")
    rows = check_rows(state.results, state.iteration)
    return write_atomically(
        path, lambda f: _fill(f, state, rows, config_text, rng, extra_group), "checkpoint",
        checkpoint_bytes(state, rows), f" (theta and optimiser state of {state.theta.size:,} "
        "parameters)", libver=("v110", "v110"))


def write_atomically(path: str | Path, fill: Callable[[h5py.File], None], what: str,
                     need: int, detail: str = "", **h5_options) -> Path:
    """An HDF5 file written by `fill` into PATH.tmp, flushed, fsynced and renamed to `path`
    (then the directory fsynced): never a half-written file. On any failure the .tmp is
    removed; a full disk or spent quota raises DiskFullError naming `what`, `path` and the
    `need` bytes (`detail`: what they are)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(tmp, "w", **h5_options) as f:
            fill(f)
            f.flush()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)  # never leave a partial file on a full disk
        if is_no_space(exc):
            raise disk_full(what, path, exc, need, detail) from None
        raise
    _fsync_dir(path.parent)
    return path


def checkpoint_bytes(state: TrainState, rows: dict[str, np.ndarray] | None = None) -> int:
    """About the size of `state`'s checkpoint file: its arrays and 64 kB of HDF5 metadata."""
    arrays = [state.theta.astype(np.float32), state.opt.m, state.opt.v, state.obs_stats.sum,
              state.obs_stats.sumsq, state.prev_lengths, *state.extras.values(),
              *(rows or state.results or {}).values()]
    return sum(np.asarray(a).nbytes for a in arrays) + 65536


def _fill(f: h5py.File, state: TrainState, rows: dict[str, np.ndarray], config_text: str,
          rng: dict | None, extra_group: tuple[str, dict, dict] | None) -> None:
    """The checkpoint's content, checksum last, into the open file `f`."""
    f.create_dataset("theta", data=state.theta.astype(np.float32))
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["iteration"] = np.int64(state.iteration)
    f.attrs["timesteps"] = np.int64(state.timesteps)
    f.attrs["episodes"] = np.int64(state.episodes)
    f.attrs["wall_seconds"] = np.float64(state.wall_seconds)
    f.attrs["config"] = config_text
    opt = f.create_group("optimizer")
    opt.attrs["step"] = np.int64(state.opt.step)
    opt.create_dataset("m", data=np.asarray(state.opt.m, dtype=np.float64))
    opt.create_dataset("v", data=np.asarray(state.opt.v, dtype=np.float64))
    obs = f.create_group("obs_stats")
    obs.create_dataset("sum", data=np.asarray(state.obs_stats.sum, dtype=np.float64))
    obs.create_dataset("sumsq", data=np.asarray(state.obs_stats.sumsq, dtype=np.float64))
    obs.attrs["count"] = np.float64(state.obs_stats.count)
    f.create_dataset("prev_lengths", data=state.prev_lengths.astype(np.int64))
    _write_members(f, "extras", state.extras)
    _write_members(f, "results", rows)
    _write_members(f, "rng", rng or {}, as_attrs=True)
    _write_members(f, "versions", library_versions(), as_attrs=True)
    if extra_group is not None:
        name, datasets, attrs = extra_group
        _write_members(f, name, datasets)
        f[name].attrs.update(attrs)
    f.attrs["checksum_algorithm"] = CHECKSUM_ALGORITHM
    f.attrs["checksum"] = content_digest(f)


def _write_members(f: h5py.File, group: str, items: dict, as_attrs: bool = False) -> None:
    """A group holding one dataset (or, with as_attrs, one attribute) per item."""
    grp = f.create_group(group)
    for name, value in items.items():
        if as_attrs:
            grp.attrs[name] = value
        else:
            grp.create_dataset(name, data=value)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX: fsync the directory entry)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path, verify: bool = True,
                    guard: bool = False) -> tuple[TrainState, str]:
    """Read a checkpoint back: (state, resolved config text). Raises CheckpointError.

    Opened without SWMR: HDF5 makes one attempt per metadata read, so damage it detects
    fails at once. With `guard`, the checkpoint is first loaded in a child process under a
    time limit (es_mpi.h5safe), against damage that makes HDF5 itself loop or crash (its
    global heap, which holds the strings, has no checksum); only a file that passed is read
    here, by the same code.
    """
    if guard:
        try:
            guarded_call(_check_loads, str(path), verify, timeout=guard_seconds(path))
        except GuardedReadError as exc:
            if exc.kind == "CheckpointError":
                raise CheckpointError(str(exc)) from None
            raise CheckpointError(f"{path}: unreadable checkpoint ({exc})") from None
    return _read_checkpoint(path, verify)


def _check_loads(path: str, verify: bool) -> None:
    """Load and drop (run in the guard's child process: only the verdict travels back)."""
    _read_checkpoint(path, verify)


def _read_checkpoint(path: str | Path, verify: bool) -> tuple[TrainState, str]:
    try:
        with h5py.File(path, "r") as f:
            if file_kind(f) == "results":
                raise CheckpointError(_results_not_checkpoint(path))
            if file_kind(f) == "pretrain_partial":
                raise CheckpointError(f"{path} is an interrupted es_mpi.pretrain's partial "
                                      "checkpoint, not a checkpoint: rerun that pretrain command "
                                      "to finish it and pass its --out")
            if verify:
                stored = f.attrs.get("checksum")
                if stored is None:
                    raise CheckpointError(f"{path}: no checksum attribute")
                actual = content_digest(f)
                if actual != stored:
                    raise CheckpointError(f"{path}: checksum mismatch (stored {stored[:16]}..., "
                                          f"computed {actual[:16]}...)")
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
                results=_stored_rows(f, int(f.attrs["iteration"])),
            )
            return state, str(f.attrs["config"])
    except CheckpointError:
        raise
    # truncated, not HDF5, missing members, undecodable metadata; TypeError: a member of the
    # wrong kind (a broken link reads as None)
    except (*HDF5_ERRORS, TypeError) as exc:
        if not_hdf5(path) and not str(path).endswith(".h5"):
            raise CheckpointError(f"{path}: not an HDF5 file, so not an es_mpi checkpoint; "
                                  "pass a checkpoint (RUN/checkpoints/ckpt_NNNNNN.h5) or a "
                                  "run directory") from None
        raise CheckpointError(f"{path}: unreadable checkpoint ({exc})") from None


def _results_not_checkpoint(path: str | Path) -> str:
    """What to say when a results file is given where a checkpoint is read."""
    run_dir = Path(path).resolve().parent
    return (f"{path} is an es_mpi results file (results.h5), not a checkpoint: pass a "
            f"checkpoint ({run_dir}/checkpoints/ckpt_NNNNNN.h5) or the run directory "
            f"({run_dir}) for its newest one")


def _stored_rows(f: h5py.File, iteration: int) -> dict[str, np.ndarray] | None:
    """The `results/` rows of a checkpoint (None in format 1, which did not store them)."""
    if "results" not in f:
        return None
    try:
        return check_rows({name: ds[()] for name, ds in f["results"].items()}, iteration)
    except ValueError as exc:
        raise CheckpointError(f"{f.filename}: {exc}") from None


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(iteration, path) of every `checkpoints/ckpt_NNNNNN.h5` in run_dir, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _CKPT_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_valid_checkpoint(run_dir: str | Path, warn: Callable[[str], None] = print,
                            guard: bool = True) -> tuple[TrainState, str, Path] | None:
    """The newest checkpoint that loads and passes its checksum; corrupt ones are reported.
    Guarded (see load_checkpoint): a damaged file never hangs or crashes the caller."""
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            state, config_text = load_checkpoint(path, guard=guard)
        except CheckpointError as exc:
            warn(f"es_mpi: WARNING: skipping corrupt checkpoint: {exc}")
            continue
        return state, config_text, path
    return None


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints and any leftover temporary files."""
    removed = []
    for _, path in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        path.unlink(missing_ok=True)
        removed.append(path)
    folder = Path(run_dir) / "checkpoints"
    if folder.is_dir():
        for tmp in folder.glob("ckpt_*.h5.tmp"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed
