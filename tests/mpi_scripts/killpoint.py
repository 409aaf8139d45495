"""Run `python -m es_mpi.run ARGS`, and kill -9 the whole job when rank 0 reaches a point.

    killpoint.py WHERE N JOB [overrides]

WHERE (rank 0, at iteration or row N):
    append-mid  inside results.h5's append of row N: other columns flushed, marker not yet
    append      right after row N is appended
    ckpt-tmp    checkpoint N written to its temporary file, not yet renamed into place
    ckpt        right after checkpoint N is renamed into place
    rebuild     a resume's rebuilt results.h5 written, not yet replacing the old one (N unused)

"The whole job" is every rank, the hydra proxy and mpiexec, all with SIGKILL at once (the
proxy and each rank run in sessions of their own, so killing mpiexec's process group would
not reach them). Must run under mpiexec; refuses to kill anything that is not its job.
"""
import os
import runpy
import signal
import sys
import types

from es_mpi import checkpoint, comm as mpi, results, resume

where, n = sys.argv[1], int(sys.argv[2])
world = mpi.world()
pids = world.allgather(os.getpid())


def _stat(pid: int) -> tuple[str, int]:
    """(command name, parent pid) of a process."""
    with open(f"/proc/{pid}/stat") as fh:
        head, tail = fh.read().rsplit(")", 1)
    return head.split("(", 1)[1], int(tail.split()[1])


def kill_job() -> None:
    _, proxy = _stat(os.getpid())
    proxy_name, launcher = _stat(proxy)
    launcher_name, _ = _stat(launcher)
    if proxy_name != "hydra_pmi_proxy" or not launcher_name.startswith("mpiexec"):
        print(f"killpoint: not under mpiexec ({proxy_name}, {launcher_name})", flush=True)
        world.Abort(1)
    sys.stdout.flush()
    for pid in [p for p in pids if p != os.getpid()] + [launcher, proxy, os.getpid()]:
        os.kill(pid, signal.SIGKILL)


def replace_killing(module, is_target) -> None:
    """`module.os.replace` kills the job when is_target(dst) (a private copy of `os`)."""
    real = os.replace
    shim = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})

    def replace(src, dst):
        if is_target(str(dst)):
            kill_job()
        real(src, dst)

    shim.replace = replace
    module.os = shim


if world.Get_rank() == 0:
    if where == "append-mid":
        real_put = results.ResultsWriter._put

        def put(self, name, row, value):
            if name == "iteration" and row == n:
                kill_job()
            real_put(self, name, row, value)

        results.ResultsWriter._put = put
    elif where == "append":
        real_append = results.ResultsWriter.append

        def append(self, row):
            real_append(self, row)
            if (row.iteration if isinstance(row, results.IterationRow) else row["iteration"]) == n:
                kill_job()

        results.ResultsWriter.append = append
    elif where == "ckpt":
        real_save = resume.save_checkpoint

        def save(path, state, *args, **kwargs):
            out = real_save(path, state, *args, **kwargs)
            if state.iteration == n:
                kill_job()
            return out

        resume.save_checkpoint = save
    elif where == "ckpt-tmp":
        replace_killing(checkpoint, lambda dst: dst.endswith(f"ckpt_{n:06d}.h5"))
    elif where == "rebuild":
        replace_killing(results, lambda dst: dst.endswith("results.h5"))
    else:
        raise SystemExit(f"killpoint: unknown point {where!r}")

sys.argv = ["es_mpi.run", *sys.argv[3:]]
runpy.run_module("es_mpi.run", run_name="__main__", alter_sys=True)
