"""Does a Decision Transformer trained by ES obey its return-to-go? Lorenc & Neruda's Table I at
small scale, next to es_mpi's return-conditioned ES (es.fitness: target_return).

    flock -x /tmp/es_mpi_cpu.lock python bench/rtg_following.py [--ranks 2] [--iterations 200]

Trains jobs/pendulum_dt_rtg.yaml twice with the same budget (iterations x pairs, seed, ranks):
  plain    es.fitness=return: every episode starts at policy.target_return (100), fitness = return
           (the papers' ES; the return-to-go carries nothing the fitness needs)
  target   es.fitness=target_return: pair j starts at R*_j ~ U[10, 100], fitness -|R - R*_j|
each with `mpiexec -n RANKS python -m es_mpi.run` (a finished run directory is reused: the run
resumes and exits at once), then evaluates both final checkpoints over a sweep of initial
returns-to-go (es_mpi.evaluate.Evaluator: theta without noise, env seeds 0..episodes-1, the same
for every target) and writes OUT/rtg_following.png (achieved against target return; the
per-target evaluation columns of results.h5 over the iterations) and OUT/summary.json.
Prints the table and the acceptance numbers: monotone rise, mean |R - R*| as a share of the
target range for the target model; spread of the plain model's means against their noise.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's es_mpi, also when another one is installed
from es_mpi.determinism import pin_cpu_kernels  # noqa: E402

pin_cpu_kernels()  # as es_mpi.run: one thread, the same CPU kernels

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from es_mpi.config import load_job  # noqa: E402
from es_mpi.evaluate import Evaluator, read_checkpoint  # noqa: E402
from es_mpi.results import EVAL_TARGET_PREFIX, ResultsError, read_results  # noqa: E402

JOB = ROOT / "jobs" / "pendulum_dt_rtg.yaml"
MODELS = {"plain": ["es.fitness=return"], "target": []}  # the job's own fitness: target_return


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2, help="MPI ranks per training run")
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--seed", type=int, default=0, help="run.seed of both models")
    p.add_argument("--episodes", type=int, default=10, help="evaluation episodes per target")
    p.add_argument("--targets", default="10,25,40,55,70,85,100",
                   help="initial returns-to-go of the evaluation sweep")
    p.add_argument("--out", default=str(ROOT / "results" / "bench_rtg"), help="output folder")
    return p.parse_args()


def rows(run_dir: Path) -> int:
    try:
        return len(read_results(run_dir / "results.h5")["iteration"])
    except (OSError, KeyError, ResultsError):
        return 0


def mpiexec() -> str:
    """The mpiexec next to this Python (pip's mpich wheel), else the one on PATH."""
    local = Path(sys.executable).parent / "mpiexec"
    found = str(local) if local.exists() else shutil.which("mpiexec")
    if not found:
        raise SystemExit("no mpiexec found: pip install 'es_mpi[mpich]' or load an MPI module")
    return found


def train(name: str, overrides: list[str], args, run_dir: Path) -> None:
    """One `mpiexec -n RANKS python -m es_mpi.run` with a progress bar over its iterations."""
    cmd = [mpiexec(), "-n", str(args.ranks), sys.executable, "-m", "es_mpi.run", str(JOB),
           f"run.dir={run_dir}", f"run.seed={args.seed}", f"run.iterations={args.iterations}",
           *overrides]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(run_dir.parent / f"{name}.log", "a") as log, \
            tqdm(total=args.iterations, desc=f"train {name}", unit="it") as bar:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            time.sleep(1.0)
            bar.update(rows(run_dir) - bar.n)
        bar.update(rows(run_dir) - bar.n)
    if proc.returncode != 0:
        raise SystemExit(f"training {name} failed (exit {proc.returncode}); see "
                         f"{run_dir.parent / f'{name}.log'}")


def evaluate(run_dir: Path, targets: list[float], episodes: int, bar) -> np.ndarray:
    """(targets, episodes) returns of the newest checkpoint's theta, env seeds 0..episodes-1."""
    ev = Evaluator(read_checkpoint(run_dir))
    out = np.zeros((len(targets), episodes))
    for i, target in enumerate(targets):
        for e in range(episodes):
            out[i, e] = ev.run(1, e, target).returns[0]
            bar.update(1)
    ev.env.close()
    return out


def acceptance(targets: np.ndarray, achieved: dict[str, np.ndarray], low: float,
               high: float) -> dict:
    """The numbers the issue asks for, per model."""
    out = {}
    for name, ret in achieved.items():
        mean, sem = ret.mean(axis=1), ret.std(axis=1) / np.sqrt(ret.shape[1])
        out[name] = {
            "mean": mean.round(2).tolist(), "std": ret.std(axis=1).round(2).tolist(),
            "monotone_rise": bool(np.all(np.diff(mean) > 0)),
            "mean_abs_error": float(np.abs(ret - targets[:, None]).mean()),
            "mean_abs_error_of_range": float(np.abs(ret - targets[:, None]).mean() / (high - low)),
            "spread_of_means": float(mean.max() - mean.min()),
            "mean_standard_error": float(sem.mean()),
        }
    return out


def plot(path: Path, targets: np.ndarray, achieved: dict, run_dirs: dict, job) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, (ax, ax_it) = plt.subplots(1, 2, figsize=(13, 5))
    lo, hi = job.es.target_range
    ax.plot([0, hi * 1.05], [0, hi * 1.05], color="grey", ls="--", lw=1, label="achieved = target")
    ax.axvspan(lo, hi, color="grey", alpha=0.08, label="training targets (target-return ES)")
    styles = {"plain": ("tab:red", f"plain ES: fitness = return, RTG {job.policy.target_return:g}"),
              "target": ("tab:blue", "target-return ES: fitness = -|R - R*|")}
    for name, ret in achieved.items():
        color, label = styles[name]
        ax.errorbar(targets, ret.mean(axis=1), yerr=ret.std(axis=1), color=color, marker="o",
                    capsize=3, lw=1.6, label=label)
    ax.set(xlabel="initial return-to-go (target return)", ylabel="achieved return",
           title=f"after training: {achieved['plain'].shape[1]} episodes per target, mean ± std")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(job.es.eval_targets)))
    for name, ls in (("target", "-"), ("plain", ":")):
        cols = read_results(run_dirs[name] / "results.h5")
        for i, c in enumerate(colors):
            y = np.convolve(cols[f"{EVAL_TARGET_PREFIX}{i}"], np.ones(5) / 5, mode="valid")
            ax_it.plot(np.arange(y.size) + 4, y, color=c, ls=ls, lw=1.4)
    for value, c in zip(job.es.eval_targets, colors):
        ax_it.axhline(value, color=c, lw=0.6, alpha=0.5)
    handles = [Line2D([], [], color=c, label=f"RTG {v:g}") for v, c in zip(job.es.eval_targets,
                                                                           colors)]
    handles += [Line2D([], [], color="k", ls="-", label="target-return ES"),
                Line2D([], [], color="k", ls=":", label="plain ES")]
    ax_it.set_ylim(bottom=-0.3 * hi)  # room for the legend below the curves
    ax_it.set_yticks([v for v in ax_it.get_yticks() if 0 <= v <= hi * 1.05])
    ax_it.legend(handles=handles, fontsize=8, ncol=3, loc="lower right")
    ax_it.set(xlabel="iteration", ylabel="evaluation return (5-iteration running mean)",
              title="during training: theta evaluated at fixed returns-to-go")
    ax_it.grid(alpha=0.3)
    iters = len(read_results(run_dirs["target"] / "results.h5")["iteration"])
    fig.suptitle(f"Does the Decision Transformer obey its return-to-go? {job.env.id}, "
                 f"{iters} iterations x {job.es.population} pairs for each model")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    job = load_job(JOB)
    targets = np.array([float(v) for v in args.targets.split(",")])
    run_dirs = {name: out / name for name in MODELS}
    for name in MODELS:
        train(name, MODELS[name], args, run_dirs[name])
    with tqdm(total=len(MODELS) * targets.size * args.episodes, desc="evaluate",
              unit="ep") as bar:
        achieved = {name: evaluate(run_dirs[name], list(targets), args.episodes, bar)
                    for name in MODELS}
    numbers = acceptance(targets, achieved, *job.es.target_range)
    final = {name: read_results(run_dirs[name] / "results.h5") for name in MODELS}
    steps = {name: int(final[name]["timesteps"][-1]) for name in MODELS}
    seconds = {name: float(final[name]["wall_seconds"][-1]) for name in MODELS}
    print(f"\n{'target':>8}  " + "  ".join(f"{n + ' mean':>12}  {n + ' std':>10}" for n in MODELS))
    for i, t in enumerate(targets):
        print(f"{t:8g}  " + "  ".join(f"{achieved[n][i].mean():12.2f}  {achieved[n][i].std():10.2f}"
                                      for n in MODELS))
    for name, num in numbers.items():
        print(f"{name}: monotone rise {num['monotone_rise']}, mean |R - R*| "
              f"{num['mean_abs_error']:.2f} ({100 * num['mean_abs_error_of_range']:.1f} % of the "
              f"target range), spread of the means {num['spread_of_means']:.2f} vs mean standard "
              f"error {num['mean_standard_error']:.2f}; {steps[name]:,} training steps, "
              f"{seconds[name]:.0f} s of training")
    png = out / "rtg_following.png"
    plot(png, targets, achieved, run_dirs, job)
    (out / "summary.json").write_text(json.dumps(
        {"targets": targets.tolist(), "episodes": args.episodes, "iterations": args.iterations,
         "ranks": args.ranks, "seed": args.seed, "training_steps": steps,
         "training_seconds": seconds, "models": numbers}, indent=1))
    print(f"wrote {png} and {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
