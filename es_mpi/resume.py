"""Where a run starts: the newest valid checkpoint in run.dir, or afresh; and saving one.

Rank 0 alone reads and writes run.dir; the decision is broadcast, so every rank continues from
the same state.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import sys
import tempfile
from pathlib import Path

from .checkpoint import (checkpoint_path, latest_valid_checkpoint, list_checkpoints,
                         prune_checkpoints, save_checkpoint)
from .config import NUMBER_FREE_KEYS, ConfigError, JobConfig, flatten
from .h5safe import DiskFullError
from .launch import EXIT_DISK_FULL, EXIT_PREEMPTED, PreemptionFlag

# Keys that may differ between a checkpoint's config and the resuming command's, because they
# change no number of the run: extending it (run.iterations), moving its directory (run.dir:
# the checkpoint was found there, so a relative vs absolute spelling or a copied run dir is
# the same run), how often it saves, prunes, checks or how many threads torch uses, and how
# the work is shared out (run.update, run.assignment: the same bits either way): run.iterations
# and config.NUMBER_FREE_KEYS.
RESUME_IGNORED_KEYS = ("run.iterations", *NUMBER_FREE_KEYS)

# Lock files held by this process for the whole run: {run dir: open file}.
_held_locks: dict[str, object] = {}


def check_run_dir(run_dir: Path) -> None:
    """Raise ConfigError unless run_dir is, or can be made, a writable directory.

    Modifies nothing: a missing run_dir is probed by creating and removing a temporary
    directory in its nearest existing parent (that also catches /proc-like file systems).
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.dir: {run_dir} exists and is not a directory")
    base = next(p for p in (run_dir, *run_dir.parents) if p.exists() or p == p.parent)
    if not base.is_dir():
        raise ConfigError(f"run.dir: cannot create {run_dir}: {base} is not a directory")
    try:
        read_only = bool(os.statvfs(base).f_flag & os.ST_RDONLY)
        if not read_only and base != run_dir:
            os.rmdir(tempfile.mkdtemp(prefix=".es_mpi_probe_", dir=base))
    except OSError as exc:
        raise ConfigError(f"run.dir: cannot create {run_dir}: {exc.strerror}") from None
    if read_only:
        raise ConfigError(f"run.dir: {base} is on a read-only file system")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ConfigError(f"run.dir: {base} is not writable by this user")


def lock_run_dir(run_dir: Path) -> str | None:
    """Rank 0: hold an exclusive lock on run_dir/.lock; None, or who holds it already.

    Two jobs writing one run.dir (a resubmission while the first still runs) would overwrite
    each other's results and checkpoints. The OS drops the lock when the process dies, so a
    killed or preempted job never leaves a stale lock behind. Nothing is written into the
    file here (`claim_lock` does that once the start goes ahead), so taking and releasing
    the lock of an existing file changes nothing.
    """
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / ".lock", "a+")  # append mode: opening changes neither data nor mtime
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        return holder
    _held_locks[str(run_dir)] = handle
    return None


def claim_lock(run_dir: Path) -> None:
    """Record this process (host, pid, SLURM job) in the lock it holds on run_dir."""
    import socket

    handle = _held_locks[str(run_dir)]
    handle.seek(0)
    handle.truncate()
    handle.write(f"host {socket.gethostname()} pid {os.getpid()} "
                 f"slurm job {os.environ.get('SLURM_JOB_ID', '-')}\n")
    handle.flush()


def release_lock(run_dir: Path) -> None:
    """Give up the lock on run_dir, leaving the file as it was."""
    _held_locks.pop(str(run_dir)).close()


def config_differences(saved_text: str, cfg: JobConfig,
                       ignore: tuple[str, ...] = RESUME_IGNORED_KEYS) -> list[str]:
    """'key: saved -> now' for every resolved key that differs, except the ignored ones.

    The saved text is re-read through the current loader when possible, so keys added to
    es_mpi since the checkpoint (with their defaults) do not count as differences.
    """
    from .config import load_yaml, loads
    try:
        saved = loads(saved_text).to_dict()
    except ConfigError:
        saved = load_yaml(saved_text) or {}
    old, new = flatten(saved), flatten(cfg.to_dict())
    missing = "<absent>"
    return [f"{k}: {old.get(k, missing)!r} -> {new.get(k, missing)!r}"
            for k in sorted(set(old) | set(new))
            if k not in ignore and old.get(k, missing) != new.get(k, missing)]


class ResumeRefused(Exception):
    """run.dir holds a checkpoint this command must not continue (message says why)."""


def _resume_decision(cfg: JobConfig, force: bool) -> tuple:
    """Rank 0: ('fresh',) or ('resume', state, path) or ('refuse', message).

    A refusal modifies nothing in run.dir (the lock file included)."""
    run_dir = Path(cfg.run.dir)
    warn = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    try:
        check_run_dir(run_dir)
        decision = _decide_locked(cfg, run_dir, force, warn)
    except ConfigError as exc:
        return ("refuse", str(exc))
    except OSError as exc:
        return ("refuse", f"run.dir: cannot use {run_dir}: {exc}")
    if decision[0] != "refuse":
        claim_lock(run_dir)
        # --force over checkpoints that are all corrupt starts over: keep them aside
        set_aside_newer(run_dir, decision[1].iteration if decision[0] == "resume" else -1, warn)
    return decision


def _decide_locked(cfg: JobConfig, run_dir: Path, force: bool, warn) -> tuple:
    """The decision, taken holding run_dir's lock, which is kept unless the start is refused.

    A run dir without a .lock file is held by no run: there the decision comes first and the
    lock file is made only when the run goes ahead, so a refusal creates nothing.
    """
    def in_use(holder: str) -> tuple:
        return ("refuse", f"{run_dir} is in use by another es_mpi run ({holder}); wait for it "
                          "to end or choose another run.dir")

    if (run_dir / ".lock").exists():
        holder = lock_run_dir(run_dir)
        if holder is not None:
            return in_use(holder)
        decision = _choose_start(cfg, run_dir, force, warn)
        if decision[0] == "refuse":
            release_lock(run_dir)
        return decision
    decision = _choose_start(cfg, run_dir, force, warn)
    if decision[0] == "refuse":
        return decision
    holder = lock_run_dir(run_dir)
    return decision if holder is None else in_use(holder)


def _choose_start(cfg: JobConfig, run_dir: Path, force: bool, warn) -> tuple:
    """Read-only: the newest valid checkpoint to resume, afresh, or refuse (and why)."""
    found = latest_valid_checkpoint(run_dir, warn)
    if found is None:
        if list_checkpoints(run_dir) and not force:
            return ("refuse", f"{run_dir}/checkpoints holds checkpoints but none passes its "
                              "checksum; inspect them, or pass --force to start over")
        return ("fresh",)
    state, saved_text, path = found
    diffs = config_differences(saved_text, cfg)
    if diffs and not force:
        return ("refuse", f"{path} was made with a different configuration:\n  "
                + "\n  ".join(diffs) + f"\nOnly {', '.join(RESUME_IGNORED_KEYS)} may change on "
                "resume. Repeat the original job and overrides, choose a new run.dir, or pass "
                "--force to resume with the new settings.")
    if diffs:
        warn("es_mpi: WARNING: --force: resuming with a changed configuration:\n  "
             + "\n  ".join(diffs))
    return ("resume", state, path)


def set_aside_newer(run_dir: Path, iteration: int, warn) -> None:
    """Rename checkpoints newer than the one resumed (corrupt, else it would have been taken)
    to *.corrupt: kept for inspection, but no longer counted by pruning or by resume."""
    for it, path in list_checkpoints(run_dir):
        if it > iteration:
            path.rename(path.with_name(path.name + ".corrupt"))
            warn(f"es_mpi: WARNING: moved corrupt {path.name} aside to {path.name}.corrupt")


def resume_or_start(cfg: JobConfig, comm, force: bool = False):
    """Collective: the checkpointed state to continue from (same on every rank), or None.

    Rank 0 picks the newest checkpoint in run.dir that passes its checksum (skipping corrupt
    ones with a warning) and checks its config; the state is broadcast, so only rank 0 needs
    to see run.dir. None means start afresh (every rank builds the same initial state from
    run.seed). Raises ResumeRefused on every rank when resuming is refused. Runs before the
    runtime (envs, noise table) is built, so a refused or already complete run exits at once.
    """
    decision = _resume_decision(cfg, force) if comm.Get_rank() == 0 else None
    decision = comm.bcast(decision, root=0)
    if decision[0] == "refuse":
        raise ResumeRefused(decision[1])
    if decision[0] == "fresh":
        return None
    if comm.Get_rank() == 0:
        print(f"es_mpi: resuming from {decision[2]} (iteration {decision[1].iteration})",
              flush=True)
    return decision[1]


def check_compatible(state, num_params: int) -> None:
    """A resumed theta must fit the policy (it may not after --force with another policy)."""
    if state.theta.size != num_params:
        raise ResumeRefused(f"the checkpoint's theta has {state.theta.size} parameters but "
                            f"the policy has {num_params}")


def rng_info(cfg: JobConfig) -> dict:
    """How randomness is derived (recorded in checkpoints; no generator state is carried)."""
    return dict(scheme="draws of iteration t: SeedSequence([run.seed, t, 0x5EED]); an "
                       "episode's own randomness: SeedSequence([run.seed, t, 0xE915, kind, j, "
                       "sign]); noise table chunk k: SeedSequence([noise_seed, k]); initial "
                       "theta: torch.manual_seed(run.seed)",
                run_seed=cfg.run.seed, noise_seed=cfg.es.noise_seed,
                noise_table_size=cfg.es.noise_table_size)


def write_checkpoint(cfg: JobConfig, state, results: dict) -> Path:
    """Rank 0: checkpoint `state` with the results rows 0..iteration-1 (the ResultsWriter's),
    then keep only the newest run.keep_checkpoints."""
    path = save_checkpoint(checkpoint_path(cfg.run.dir, state.iteration),
                           dataclasses.replace(state, results=results), cfg.to_yaml(),
                           rng_info(cfg))
    prune_checkpoints(cfg.run.dir, cfg.run.keep_checkpoints)
    return path


def checkpoint_on_preemption(cfg: JobConfig, comm, flag: PreemptionFlag, state,
                             saved: bool, results: dict | None) -> int:
    """All ranks: rank 0 checkpoints (unless this iteration is saved already); exit code 3.

    `results`: rank 0's results rows (None on the other ranks)."""
    signalled = comm.gather(flag.signum, root=0)
    code = EXIT_PREEMPTED
    if comm.Get_rank() == 0:
        path = checkpoint_path(cfg.run.dir, state.iteration)
        try:
            if not saved and state.iteration > 0:
                write_checkpoint(cfg, state, results)
        except DiskFullError as exc:
            print(f"es_mpi: disk full: {exc}. Preempted after iteration {state.iteration} "
                  f"without a checkpoint of it; free space and run the same command to resume "
                  f"from the newest checkpoint. Exit code {EXIT_DISK_FULL}.", file=sys.stderr,
                  flush=True)
            code = EXIT_DISK_FULL
        who = ", ".join(f"rank {r}: {signal.Signals(s).name}"
                        for r, s in enumerate(signalled) if s is not None)
        if code == EXIT_PREEMPTED:
            print(f"es_mpi: preempted ({who}) after iteration {state.iteration}; checkpoint "
                  f"{path if state.iteration > 0 else '(none needed)'}; run the same command "
                  f"to resume. Exit code {EXIT_PREEMPTED}.", flush=True)
    # no rank exits (and lets the launcher tear down) before the checkpoint: all wait for it
    return comm.bcast(code, root=0)
