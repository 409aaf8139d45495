"""The shipped paper jobs and how the scaling benchmarks shrink them (bench/scaling.py,
bench/scale_model.py). Shrinking changes the population, the evaluation episodes, the noise
table and (Atari) the frame cap; every other setting is the job's own."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# job name -> (job file, overrides for the shrunk runs: what makes one iteration take seconds
# on a laptop, not minutes)
PAPER_JOBS = {
    "humanoid_mlp": ("jobs/humanoid_mlp.yaml", []),
    "humanoid_dt": ("jobs/humanoid_dt.yaml", []),
    "atari_hero": ("jobs/atari_hero.yaml", ["env.max_frames=2000"]),  # <= 500 agent steps
    "humanoid_openai": ("jobs/humanoid_openai.yaml", []),
}
# pairs per rank in the shrunk runs: an iteration of ~1 s on one rank, early in training
PAIRS_PER_RANK = {"humanoid_mlp": 16, "humanoid_dt": 6, "atari_hero": 1, "humanoid_openai": 16}
SMALL_TABLE = 20_000_000  # float32 values (80 MB): enough for the Atari DT's 2.97M parameters


def job_path(name: str) -> str:
    if name not in PAPER_JOBS:
        raise SystemExit(f"unknown job {name!r}; choose from {', '.join(PAPER_JOBS)}")
    return str(REPO / PAPER_JOBS[name][0])


def load(name: str, overrides: list[str] = ()):
    """The job as shipped (plus `overrides`), with a throw-away run.dir."""
    from es_mpi.config import load_job

    return load_job(job_path(name), [f"run.dir=/tmp/es_mpi_bench_{name}", *overrides])


def shrunk(name: str, ranks: int, pairs_per_rank: int | None = None, overrides: list[str] = ()):
    """The job with its population proportional to the rank count (weak scaling), one
    evaluation episode per rank (at most the job's own number), a small noise table."""
    full = load(name)
    pairs = (pairs_per_rank or PAIRS_PER_RANK[name]) * ranks
    evals = min(full.es.eval_episodes, ranks)
    return load(name, [f"es.population={pairs}", f"es.eval_episodes={evals}",
                       f"es.noise_table_size={SMALL_TABLE}", *PAPER_JOBS[name][1], *overrides])
