"""`python -m es_mpi.run JOB.yaml [section.key=value ...]`: the SPMD training loop.

Every rank runs this same loop (no master): run the episodes the work assignment gives it,
gather the scalars keyed by episode, rebuild every eps_j from the shared noise table and apply
the same update, so theta stays bitwise identical everywhere without being sent. The set-up is
in es_mpi/runtime.py, one iteration's stages in es_mpi/iteration.py.
"""
from __future__ import annotations

from .determinism import pin_cpu_kernels

pin_cpu_kernels()  # one thread per rank, same kernels on every node: before numpy/torch

import argparse  # noqa: E402
import sys  # noqa: E402

from .config import ConfigError, JobConfig, load_job, repeated_overrides  # noqa: E402
from .h5safe import DiskFullError, is_no_space  # noqa: E402
from .iteration import Diverged, run_iteration  # noqa: E402
from .launch import (EXIT_ABORTED, EXIT_CONFIG_ERROR, EXIT_DISK_FULL,  # noqa: E402
                     EXIT_DIVERGED, EXIT_LAUNCHER_ERROR, EXIT_OK, EXIT_PREEMPTED,
                     PreemptionFlag, check_launcher)
from .resume import (RESUME_IGNORED_KEYS, checkpoint_on_preemption,  # noqa: E402
                     write_checkpoint)
from .runtime import (build_training_policy, dubious_settings, open_results,  # noqa: E402
                      preflight, start)

EPILOG = f"""\
Run directory: run.dir/config.yaml, results.h5, checkpoints/ckpt_NNNNNN.h5.
Running the same command again resumes from the newest checkpoint that passes its checksum
(corrupt ones are reported and skipped) and recomputes, bitwise identically, the iterations
after it. A config that differs from the checkpoint's in anything but
{", ".join(RESUME_IGNORED_KEYS)}
is refused unless --force. A run that is already complete exits 0 at once. Only one run at a
time may use a run.dir (rank 0 holds run.dir/.lock); a second one is refused with exit 2.

Exit codes:
  {EXIT_OK}  done (run.iterations reached; also when it already was at start)
  {EXIT_CONFIG_ERROR}  configuration error, or resume refused
  {EXIT_PREEMPTED}  preempted: SIGTERM, SIGUSR1 or SIGINT (Ctrl-C) reached at least one rank
     (MPICH's mpiexec forwards all three to every rank); at the next iteration boundary all
     ranks agreed, rank 0 wrote a checkpoint and every rank exited {EXIT_PREEMPTED}. Re-run the same
     command to resume. A second Ctrl-C aborts at once without a checkpoint (a process alone
     exits {EXIT_ABORTED}; mpiexec kills its ranks itself).
  {EXIT_LAUNCHER_ERROR}  launcher error: SLURM started N>1 tasks but this MPI world has one rank
     (plain `srun` without a PMI plugin); nothing was trained
  {EXIT_DIVERGED}  diverged: theta, the optimiser state, the observation statistics or the returns
     became inf or NaN; nothing of that iteration was stored (the checkpoints in run.dir are
     all finite). Lower es.lr or es.sigma.
  {EXIT_DISK_FULL}  disk full (or quota spent): a checkpoint or results.h5 did not fit; rank 0
     named the file and the space it needs, removed the partial file, and every rank stopped.
     Free space and run the same command to resume from the newest checkpoint.
  1  any other failure (the whole job is aborted)

--print-config prints the resolved configuration (every key, defaults filled in, overrides
applied and validated) as YAML and exits: no MPI, no environment, no files. Run it without
mpiexec.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m es_mpi.run", description=__doc__.splitlines()[0],
                                usage="%(prog)s JOB.yaml [section.key=value ...] [--force] "
                                      "[--print-config]",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job", nargs="?", help="job YAML file, e.g. jobs/quickstart.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. es.sigma=0.05")
    p.add_argument("--force", action="store_true",
                   help="resume even if the config differs from the checkpoint's, or start "
                        "over when run.dir holds checkpoints but none is valid")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration as YAML and exit (nothing is run)")
    args = p.parse_args(argv)
    if args.job is None:
        p.error("name a job file: python -m es_mpi.run JOB.yaml [section.key=value ...], "
                "e.g. jobs/quickstart.yaml")
    return args


def print_config(args: argparse.Namespace) -> int:
    """--print-config: the resolved YAML on stdout (warnings and errors on stderr); no MPI."""
    for line in repeated_overrides(args.overrides):
        print(f"es_mpi: WARNING: {line}", file=sys.stderr, flush=True)
    try:
        cfg = load_job(args.job, args.overrides)
    except ConfigError as exc:
        print(f"es_mpi: configuration error: {exc}", file=sys.stderr, flush=True)
        return EXIT_CONFIG_ERROR
    print(cfg.to_yaml(), end="", flush=True)
    return EXIT_OK


def agree(comm, step, *args):
    """Run `step(*args)` on every rank; if it raises ConfigError anywhere, all ranks return None.

    Bad input is reported once (by the lowest failing rank), with exit code 2 and no traceback,
    and no rank is left waiting in a collective for one that failed.
    """
    from . import comm as mpi

    result, error = None, None
    try:
        result = step(*args)
    except ConfigError as exc:
        error = str(exc)
    first_failed = mpi.first_failing_rank(comm, error is not None)
    if first_failed is not None:
        if comm.Get_rank() == first_failed:
            print(f"es_mpi: configuration error: {error}", file=sys.stderr, flush=True)
        return None
    return result


def train(cfg: JobConfig, comm, env, policy, flag: PreemptionFlag | None = None,
          force: bool = False) -> int:
    """Start or resume, iterate until done or preempted, release the shared windows."""
    from . import comm as mpi

    state, rt, code = start(cfg, comm, env, policy, force)
    if code is not None:
        return code
    mpi.check_identical(comm, state.theta, state.iteration - 1)
    writer, full = None, None
    if comm.Get_rank() == 0:
        try:
            writer = open_results(cfg, state, comm, rt)
        except OSError as exc:
            if not is_no_space(exc):
                raise
            full = exc  # every rank learns it at the first iteration boundary
    try:
        code = iterate(cfg, comm, rt, state, writer, flag or PreemptionFlag(), full)
    finally:
        if writer is not None:
            writer.close()
    rt.free()  # collective: only on the way out of a run that ended normally
    return code


def checkpoint_due(cfg: JobConfig, iteration: int) -> bool:
    return iteration % cfg.run.checkpoint_every == 0 or iteration == cfg.run.iterations


def record(cfg: JobConfig, writer, state, row) -> OSError | None:
    """Rank 0: append the row, print it, checkpoint when due; a full disk is returned."""
    try:
        writer.append(row)
        print(row.summary(), flush=True)
        if checkpoint_due(cfg, state.iteration):
            write_checkpoint(cfg, state, writer.rows())
    except DiskFullError as exc:
        return exc
    return None


def iterate(cfg: JobConfig, comm, rt, state, writer, flag: PreemptionFlag,
            full: OSError | None = None) -> int:
    """The loop: iterate, log, checkpoint; stop at a preemption boundary, or when rank 0
    found the disk full (`full`, the error), with EXIT_DISK_FULL on every rank."""
    from . import comm as mpi

    saved = True  # the state we start from is a checkpoint (or the initial state)
    while True:  # the iteration boundary: every rank decides the same (one collective)
        disk_full, preempted = mpi.any_rank_each(comm, full is not None, flag.is_set())
        if disk_full:
            return EXIT_DISK_FULL if full is None else report_disk_full(cfg, full, state)
        if state.iteration >= cfg.run.iterations:
            break
        if preempted:
            return checkpoint_on_preemption(cfg, comm, flag, state, saved,
                                            writer.rows() if writer else None)
        try:
            state, row = run_iteration(cfg, comm, rt, state)
        except Diverged as exc:  # raised on every rank alike: the values are the same
            if writer is not None:
                report_divergence(cfg, exc)
            return EXIT_DIVERGED
        saved = checkpoint_due(cfg, state.iteration)
        if cfg.run.verify_every and state.iteration % cfg.run.verify_every == 0:
            mpi.check_identical(comm, state.theta, state.iteration - 1)
        if writer is not None:
            full = record(cfg, writer, state, row)
    mpi.check_identical(comm, state.theta, state.iteration - 1)
    comm.Barrier()
    return EXIT_OK


def report_divergence(cfg: JobConfig, exc: Diverged) -> None:
    """Rank 0: what became non-finite, and what is left in run.dir."""
    from .checkpoint import list_checkpoints

    found = list_checkpoints(cfg.run.dir)
    kept = f"the newest checkpoint is {found[-1][1]}" if found else "no checkpoint was written"
    print(f"es_mpi: diverged: {exc} (es.lr={cfg.es.lr}, es.sigma={cfg.es.sigma}); the run "
          f"stops without storing them; {kept}. Lower es.lr or es.sigma. Exit code "
          f"{EXIT_DIVERGED}.", file=sys.stderr, flush=True)


def report_disk_full(cfg: JobConfig, error: OSError, state) -> int:
    """Rank 0: what did not fit and how to go on (the other ranks exit with the same code)."""
    from .checkpoint import list_checkpoints

    found = list_checkpoints(cfg.run.dir)
    then = (f"resume from its newest checkpoint, {found[-1][1]} (iteration {found[-1][0]}; "
            "the iterations after it are recomputed, bitwise the same)" if found
            else "start over (no checkpoint was written yet)")
    cleaned = " No partial file is left behind." if isinstance(error, DiskFullError) else ""
    print(f"es_mpi: disk full: {error}.{cleaned} Stopped after "
          f"iteration {state.iteration}: free space (or move run.dir to a larger file system) "
          f"and run the same command to {then}. Exit code {EXIT_DISK_FULL}.", file=sys.stderr,
          flush=True)
    return EXIT_DISK_FULL


def launch(comm, args, flag: PreemptionFlag) -> int:
    """Check the launcher, load the job, check run.dir and build the env (cheap, before
    torch), build the policy (all ranks agree at each step), then train."""
    if not check_launcher(comm):
        return EXIT_LAUNCHER_ERROR
    is_root = comm.Get_rank() == 0
    cfg = agree(comm, load_job, args.job, args.overrides)
    env = None if cfg is None else agree(comm, preflight, cfg, is_root)
    policy = None if env is None else agree(comm, build_training_policy, cfg, env)
    if policy is None:
        return EXIT_CONFIG_ERROR
    if is_root:
        for line in repeated_overrides(args.overrides) + dubious_settings(cfg, env, policy):
            print(f"es_mpi: WARNING: {line}", file=sys.stderr, flush=True)
    return train(cfg, comm, env, policy, flag, args.force)


def main(argv: list[str] | None = None) -> int:
    flag = PreemptionFlag().install()  # first: a signal during start-up must not kill us
    args = parse_args(argv)
    if args.print_config:
        return print_config(args)
    from . import comm as mpi

    comm = mpi.world()
    flag.announce = comm.Get_rank() == 0
    # Any exception on any rank, set-up included, ends the whole job (no rank left waiting).
    return mpi.abort_on_exception(comm, launch, comm, args, flag)


if __name__ == "__main__":
    sys.exit(main())
