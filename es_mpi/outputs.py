"""Files a command will write at its end, checked before any work (one rule for every tool).

An output's folder need not exist yet (it is made when the file is written, as run.dir is);
the nearest folder that does exist above it must take a new file. The check creates and
removes a probe file there and leaves nothing else behind, so a command refused later (a
mistyped checkpoint, a bad option) has made no folders. No MPI, no torch.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .config import ConfigError


def check_writable(option: str, path: str | Path, suffixes: tuple[str, ...] = ()) -> Path:
    """The absolute `path` of a file to write later, or ConfigError naming `option` and why
    not: a wrong suffix, a folder, a file in the way of its folder, no permission, a
    read-only or /proc-like file system."""
    path = Path(path).absolute()
    if suffixes and path.suffix.lower() not in suffixes:
        raise ConfigError(f"{option}: {path.name!r} should end in one of {', '.join(suffixes)}")
    if path.is_dir():
        raise ConfigError(f"{option}: cannot write {path}: it is a folder; name the file")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(f"{option}: cannot write {path}: {folder} is not a folder")
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{option}: cannot write {path}: the file is not writable")
    try:
        fd, probe = tempfile.mkstemp(prefix=".es_mpi_probe_", dir=folder)
    except OSError as exc:
        raise ConfigError(f"{option}: cannot write {path}: {folder}: {exc.strerror}") from None
    os.close(fd)
    os.unlink(probe)
    return path


def make_parent(path: str | Path) -> Path:
    """`path`, with its folder made if missing (at the moment the file is written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
