"""Reading HDF5 files that may be damaged: fail with a named error in bounded time, never hang.

Two ways a damaged file can stop a reader for good, and what bounds each:

- An SWMR reader retries a metadata read whose checksum does not match (the writer may be
  in the middle of writing it), sleeping 1 ns, 2 ns, 4 ns, ... between attempts; HDF5's
  default of 100 attempts (2**100 ns) makes a truncated results.h5 block for ever.
  `open_read` bounds the attempts (`H5Pset_metadata_read_attempts`, which h5py does not
  expose: called through ctypes on the very HDF5 library h5py loaded).
- Parts of the format carry no checksum (the global heap that holds variable-length
  strings, raw data): a flipped bit there can make the library loop or crash. Only a time
  limit bounds that, and only in another process: `guarded_call` runs the read in a fresh
  Python process that is killed past its limit (a stuck thread would keep h5py's lock).

Also what readers and writers of es_mpi's files share: telling a checkpoint from a results
file (`file_kind`), and naming a write that failed for want of space (`DiskFullError`).

Never imports MPI.
"""
from __future__ import annotations

import ctypes
import errno
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import h5py

# What h5py raises for a damaged, truncated or foreign file (the C error stack is mapped onto
# these, e.g. RuntimeError "Can't decode fractal heap header prefix", KeyError for a missing
# member, OSError for most others); GuardedReadError is an OSError.
HDF5_ERRORS = (OSError, KeyError, ValueError, RuntimeError)

# Attempts for readers of a possibly live file: the retries sleep 2**28 ns (0.27 s) in all,
# far longer than a writer needs to finish a metadata write; a damaged file fails in ~0.3 s.
LIVE_READ_ATTEMPTS = 28
# Where no writer can exist (run.dir is locked by this process): a mismatch is damage.
NO_WRITER_READ_ATTEMPTS = 1
# Time limit of a guarded read: start-up (~0.3 s) and reading, with a wide margin.
GUARD_SECONDS = 10.0
GUARD_BYTES_PER_SECOND = 50e6  # plus one second per 50 MB of file

_lib: ctypes.CDLL | None | bool = False  # False: not looked up yet; None: not available


# A write that fails with one of these found its file system full (or the user's quota spent).
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """Writing an es_mpi file failed for want of space: names the file, the space it needs
    (an estimate) and what is free. The partial file has been removed."""


def is_no_space(exc: BaseException) -> bool:
    """True if `exc` is a write that failed because the file system is full (or over quota).
    h5py keeps the errno when it can; otherwise it is only in HDF5's message."""
    if not isinstance(exc, (OSError, RuntimeError)):  # h5py: RuntimeError for a failed flush
        return False
    if getattr(exc, "errno", None) in NO_SPACE_ERRNOS:
        return True
    text = str(exc)
    return any(f"errno = {code}," in text or os.strerror(code) in text for code in NO_SPACE_ERRNOS)


def megabytes(n: float) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 1e5 else f"{n / 1e3:,.0f} kB"


def free_bytes(folder: str | Path) -> int | None:
    """Bytes this user may still write on the file system of `folder` (None if unknown)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def disk_full(what: str, path: Path, exc: Exception, need: int | None, detail: str = ""
              ) -> DiskFullError:
    """The DiskFullError for a failed write of `path` (called after the partial file is gone)."""
    free = free_bytes(path.parent)
    need_text = "" if need is None else f"; it needs about {megabytes(need)}{detail}"
    free_text = "" if free is None else f", {megabytes(free)} free there now"
    code = getattr(exc, "errno", None)
    code = code if code in NO_SPACE_ERRNOS else errno.ENOSPC
    err = DiskFullError(f"cannot write {what} {path}: {os.strerror(code)}{need_text}{free_text}")
    err.errno = code
    return err


def not_hdf5(path: str | Path) -> bool:
    """True if `path` is a readable file without an HDF5 signature (h5py.is_hdf5)."""
    try:
        return not h5py.is_hdf5(path)
    except (OSError, ValueError):
        return False


PRETRAIN_PARTIAL = "es_mpi.pretrain partial"  # the `kind` attribute of OUT.partial.h5


def file_kind(f: h5py.File) -> str:
    """'checkpoint', 'results', 'pretrain_partial' (an interrupted es_mpi.pretrain's
    OUT.partial.h5) or 'other': which kind of es_mpi file an open HDF5 file is."""
    if "theta" in f and "optimizer" in f:
        return "checkpoint"
    if f.attrs.get("kind") == PRETRAIN_PARTIAL:
        return "pretrain_partial"
    if "iterations" in f and "theta" not in f:
        return "results"
    return "other"


class GuardedReadError(OSError):
    """A guarded read failed: it raised (`kind` = the exception's class name), crashed
    (`kind` = 'crash') or ran past its time limit (`kind` = 'timeout')."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


class GuardUnavailable(Exception):
    """The reader process could not be started: no verdict on the file."""


def _hdf5_library() -> ctypes.CDLL | None:
    """The libhdf5 h5py uses (found in this process's memory map), or None."""
    global _lib
    if _lib is not False:
        return _lib
    _lib = None
    try:
        with open("/proc/self/maps") as fh:
            paths = {line.split()[-1] for line in fh if "libhdf5" in line}
    except OSError:
        return None
    probe = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    for path in sorted(paths):
        name = os.path.basename(path)
        if not name.startswith("libhdf5") or "_hl" in name or ".so" not in name:
            continue
        try:
            lib = ctypes.CDLL(path)
            lib.H5Pset_metadata_read_attempts.argtypes = [ctypes.c_int64, ctypes.c_uint]
            lib.H5Iis_valid.argtypes = [ctypes.c_int64]
        except (OSError, AttributeError):
            continue
        if lib.H5Iis_valid(probe.id) > 0:  # the same library instance as h5py's
            _lib = lib
            break
    return _lib


def retries_can_be_bounded() -> bool:
    return _hdf5_library() is not None


def open_read(path: str | Path, swmr: bool = True,
              attempts: int | None = LIVE_READ_ATTEMPTS) -> h5py.File:
    """h5py.File(path, 'r', swmr=swmr) with at most `attempts` tries per metadata read.

    Where the bound cannot be set (see `retries_can_be_bounded`) HDF5's default stays, so
    such a read is safe only inside `guarded_call`. Raises one of HDF5_ERRORS on damage.
    """
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5py.h5f.LIBVER_EARLIEST, h5py.h5f.LIBVER_LATEST)
    flags = h5py.h5f.ACC_RDONLY
    if swmr:
        flags |= h5py.h5f.ACC_SWMR_READ
        lib = _hdf5_library()
        if attempts is not None and lib is not None:
            lib.H5Pset_metadata_read_attempts(fapl.id, max(1, attempts))
    return h5py.File(h5py.h5f.open(os.fsencode(path), flags, fapl=fapl))


def guard_seconds(path: str | Path) -> float:
    """The time limit for reading `path` in a guarded call."""
    try:
        size = os.path.getsize(path)
    except OSError:
        size = 0
    return GUARD_SECONDS + size / GUARD_BYTES_PER_SECOND


# The reader process: import the function, say "ready" (R), run it, answer with a pickle.
_CHILD = """\
import pickle, sys
from importlib import import_module
func = getattr(import_module(sys.argv[1]), sys.argv[2])
args = pickle.load(sys.stdin.buffer)
sys.stdout.buffer.write(b"R")
sys.stdout.buffer.flush()
try:
    answer = ("ok", func(*args))
except Exception as exc:
    answer = ("error", type(exc).__name__, str(exc))
sys.stdout.buffer.write(pickle.dumps(answer))
"""


def call_in_child(func, *args, timeout: float = GUARD_SECONDS):
    """`func(*args)` in a fresh Python process, killed after `timeout` seconds.

    `func` is a module-level function of an importable module; arguments and result are
    pickled (over pipes, never to files). Raises GuardedReadError if it raised, crashed or
    timed out, and GuardUnavailable if the process could not get as far as calling it.
    """
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-c", _CHILD, func.__module__, func.__name__]
    try:
        proc = subprocess.run(cmd, input=pickle.dumps(args), capture_output=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        if not (exc.stdout or b"").startswith(b"R"):
            raise GuardUnavailable(f"the reader process did not start in {timeout:.0f} s") from None
        raise GuardedReadError(f"no answer within {timeout:.0f} s (damaged HDF5 metadata can "
                               "make the library loop)", "timeout") from None
    except OSError as exc:
        raise GuardUnavailable(f"cannot start a reader process: {exc}") from None
    if not proc.stdout.startswith(b"R"):
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise GuardUnavailable(f"the reader process failed to start: {tail[0]}")
    if proc.returncode != 0 or len(proc.stdout) == 1:
        raise GuardedReadError(f"the reader process crashed ({_exit_status(proc.returncode)})",
                               "crash")
    answer = pickle.loads(proc.stdout[1:])
    if answer[0] == "error":
        raise GuardedReadError(answer[2], answer[1])
    return answer[1]


def _exit_status(code: int) -> str:
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def guarded_call(func, *args, timeout: float = GUARD_SECONDS):
    """`call_in_child`, or `func(*args)` right here if no reader process can be started
    (with a warning: then only the bounded retries protect the read)."""
    try:
        return call_in_child(func, *args, timeout=timeout)
    except GuardUnavailable as exc:
        print(f"es_mpi: WARNING: {exc}; reading in this process", file=sys.stderr, flush=True)
        return func(*args)

