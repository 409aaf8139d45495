"""How a run is launched and stopped: exit codes, preemption signals, the launcher check.

No MPI here: the collective parts take a `comm` and go through `es_mpi.comm`.
"""
from __future__ import annotations

import os
import signal
import sys

EXIT_OK = 0  # finished: run.iterations done (also when it was already done at start)
EXIT_CONFIG_ERROR = 2  # bad job/overrides, or resume refused (config differs, no valid ckpt)
EXIT_PREEMPTED = 3  # SIGTERM/SIGUSR1/SIGINT: checkpoint written; run the same command to resume
EXIT_LAUNCHER_ERROR = 4  # SLURM started N>1 tasks but each got its own one-rank MPI world
EXIT_DIVERGED = 5  # returns, theta, optimiser state or obs statistics not finite; nothing stored
EXIT_ABORTED = 128 + signal.SIGINT  # a second SIGINT: ended at once, no checkpoint (shells: 130)
EXIT_DISK_FULL = 6  # a checkpoint or results.h5 did not fit (no space, or quota): named, no
# partial file left; free space and run the same command to resume from the newest checkpoint

def known_error(exc: BaseException) -> tuple[str, int] | None:
    """A failure the user can act on, as (one line for stderr, exit code): a configuration
    error (2) or a full disk / spent quota (6). None: anything else, a bug (a traceback)."""
    from .config import ConfigError
    from .h5safe import DiskFullError, is_no_space

    if isinstance(exc, ConfigError):
        return f"es_mpi: configuration error: {exc}", EXIT_CONFIG_ERROR
    if isinstance(exc, DiskFullError) or is_no_space(exc):
        return f"es_mpi: disk full: {exc}", EXIT_DISK_FULL
    return None


def run_tool(fn, *args, **kwargs) -> int:
    """A command-line tool's work: what `known_error` knows is one line on stderr and its
    exit code, the same in every tool (es_mpi.evaluate, collect, pretrain, convert, ...)."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - re-raised below unless known
        known = known_error(exc)
        if known is None:
            raise
        print(known[0], file=sys.stderr, flush=True)
        return known[1]


INTERRUPT_NOTE = (b"es_mpi: interrupted (SIGINT): the run stops after this iteration with a "
                  b"checkpoint and exit code 3; run the same command to resume. Press Ctrl-C "
                  b"again to abort without a checkpoint.\n")
ABORT_NOTE = b"es_mpi: aborted by a second SIGINT; the work since the last checkpoint is lost\n"


class PreemptionFlag:
    """SIGTERM / SIGUSR1 / SIGINT set a flag, nothing more; the loop acts on it at iteration
    boundaries. A second SIGINT (Ctrl-C twice) ends this process at once.

    The handler runs no MPI and no buffered I/O (a checkpoint inside a handler could interleave
    with whatever the rank was doing); the notes on SIGINT go to fd 2 with one os.write, by the
    rank `announce` is set on. A signal that lands while the rank is blocked inside an MPI call
    is recorded by Python's C-level handler and this method runs as soon as the call returns,
    so the flag is always set before the next boundary's agreement.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.interrupts = 0
        self.announce = launcher_rank(os.environ) == 0  # set again once MPI says the rank

    def install(self) -> "PreemptionFlag":
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:  # no traceback, no MPI_Finalize (other ranks may be busy)
                self._note(ABORT_NOTE)
                os._exit(EXIT_ABORTED)
            self._note(INTERRUPT_NOTE)
        self.signum = signum

    def _note(self, text: bytes) -> None:
        if self.announce:
            try:
                os.write(2, text)
            except OSError:
                pass

    def is_set(self) -> bool:
        return self.signum is not None

    def agreed(self, comm) -> bool:
        """Collective: True on every rank if any rank has been signalled."""
        from . import comm as mpi
        return mpi.any_rank(comm, self.is_set())


def launcher_rank(env: dict) -> int:
    """This process's rank as the launcher's environment says (MPICH/Intel, Open MPI, SLURM);
    0 when none does (a process alone)."""
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID"):
        if env.get(var, "").isdigit():
            return int(env[var])
    return 0


def launcher_mismatch(env: dict, world_size: int) -> str | None:
    """Why this launch is wrong, or None: SLURM says N>1 tasks but our MPI world has one rank.

    That is what plain `srun` without a PMI plugin does: N independent singletons that would
    each train the same run and write the same files.
    """
    var = next((v for v in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") if env.get(v)), None)
    if var is None or world_size != 1 or env.get("ES_ALLOW_SINGLETON") == "1":
        return None
    try:
        tasks = int(env[var])
    except ValueError:
        return None
    if tasks <= 1:
        return None
    return (f"SLURM started {tasks} tasks ({var}={tasks}) but this MPI world has 1 rank, so "
            f"each task would train the same run alone. Launch one MPI world: "
            f"`srun --mpi=pmi2` (or --mpi=pmix, whichever your MPI supports) or "
            f"`mpiexec -n $SLURM_NTASKS` inside the allocation; in slurm/*.sh set ES_LAUNCHER. "
            f"Set ES_ALLOW_SINGLETON=1 to run one rank on purpose.")


def check_launcher(comm) -> bool:
    """False (after printing why, once) if the launch gave us a one-rank world by mistake."""
    problem = launcher_mismatch(os.environ, comm.Get_size())
    if problem and os.environ.get("SLURM_PROCID", "0") == "0":
        print(f"es_mpi: launcher error: {problem}", file=sys.stderr, flush=True)
    return problem is None
