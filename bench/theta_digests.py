"""θ digests of every shipped job, for refactors that must change no number.

Each job in jobs/ runs 2 iterations at 2 ranks, shrunk (4 pairs, a 5M-value noise table, one
evaluation episode, 50-step or 400-frame episodes, `run.init_from` cleared; Atari jobs record
observation statistics with probability 0.5 so that they move within two iterations), and the
digest is blake2b-8 of the last checkpoint's θ. Record before a change, compare after:

    python bench/theta_digests.py --out /tmp/before.txt
    python bench/theta_digests.py --compare /tmp/before.txt     # exit 1 if any digest moved

Extra `section.key=value` arguments go to every job (e.g. `run.assignment=static
run.update=every_rank`); ES_MPI_NODE_SIZE=1 in the environment gives pseudo-nodes of one rank.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = ["es.population=4", "run.iterations=2", "es.noise_table_size=5000000",
        "es.eval_episodes=1", "run.init_from=null"]


def digest(job: Path, workdir: Path, overrides: list[str] = ()) -> str:
    """blake2b-8 of θ after two shrunk iterations of `job` at 2 ranks."""
    import h5py

    atari = "ALE/" in job.read_text()
    extra = ["env.max_frames=400", "env.obs_stat_prob=0.5"] if atari else \
        ["env.max_episode_steps=50"]
    run_dir = workdir / job.stem
    mpiexec = Path(sys.executable).parent / "mpiexec"
    cmd = [str(mpiexec if mpiexec.exists() else "mpiexec"), "-n", "2", sys.executable, "-m",
           "es_mpi.run", str(job), *TINY, *extra, *overrides, f"run.dir={run_dir}"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode:
        return f"FAILED(exit {proc.returncode})"
    with h5py.File(sorted((run_dir / "checkpoints").glob("ckpt_*.h5"))[-1], "r") as f:
        return hashlib.blake2b(f["theta"][()].tobytes(), digest_size=8).hexdigest()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write 'job digest' lines here")
    p.add_argument("--compare", help="a file written by --out: exit 1 if a digest differs")
    p.add_argument("overrides", nargs="*", help="section.key=value for every job")
    args = p.parse_args()
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for job in sorted((REPO / "jobs").glob("*.yaml")):
            lines.append(f"{job.stem} {digest(job, Path(tmp), args.overrides)}")
            print(lines[-1], flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    if args.compare:
        before = dict(line.split() for line in Path(args.compare).read_text().splitlines())
        moved = [line for line in lines if before.get(line.split()[0]) != line.split()[1]]
        print("unchanged" if not moved else "moved: " + ", ".join(m.split()[0] for m in moved))
        return 1 if moved else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
