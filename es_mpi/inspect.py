"""`python -m es_mpi.inspect PATH...`: summary tables, CSV and plots of results.h5 files.

PATH may be a run directory, a results.h5 file, a folder holding run directories (searched
recursively) or a glob. Files are opened in SWMR-read mode, so a running job (or one killed
with SIGKILL) can be inspected; a damaged file is named on stderr within a second and skipped
(exit code 1), never a hang. Never imports MPI.
"""
from __future__ import annotations

import argparse
import ast
import csv
import glob
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from .config import flatten
from .results import EVAL_TARGET_PREFIX, ResultsError, read_file

# Keys that tell seeds of one experiment apart; runs equal in everything else form a group.
_PER_RUN_KEYS = ("run.seed", "run.dir", "run.iterations")
# Achieved-vs-target panel: a run's achieved return at a target is the mean of its last rows.
TARGET_ROWS = 5


@dataclass
class Run:
    path: Path  # the results.h5 file
    columns: dict[str, np.ndarray]
    config: dict  # flattened resolved config ({} when the file carries none)

    @property
    def name(self) -> str:
        return str(self.path.parent)

    @property
    def iterations(self) -> int:
        return len(self.columns.get("iteration", ()))


def find_results(paths: list[str]) -> list[Path]:
    """Expand run dirs, results files, parent folders and globs into results.h5 paths."""
    found: list[Path] = []
    for text in paths:
        matches = sorted(glob.glob(text)) if glob.has_magic(text) else [text]
        for m in matches:
            p = Path(m)
            if p.is_file():
                found.append(p)
            elif (p / "results.h5").is_file():
                found.append(p / "results.h5")
            elif p.is_dir():
                found.extend(sorted(p.rglob("results.h5")))
            else:
                raise FileNotFoundError(f"{text}: no such run directory or results file")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise FileNotFoundError("no results.h5 found under " + ", ".join(paths))
    return unique


def load_runs(paths: list[str], errors: list[str] | None = None) -> list[Run]:
    """The runs under `paths`, each file read in a child process under a time limit (a few
    at a time). A damaged results.h5 raises ResultsError within seconds, or, with an `errors`
    list, is reported there and skipped."""
    files = find_results(paths)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        outcomes = list(pool.map(_read_run, files))
    runs = []
    for outcome in outcomes:
        if isinstance(outcome, ResultsError):
            if errors is None:
                raise outcome
            errors.append(str(outcome))
        else:
            runs.append(outcome)
    return runs


def _read_run(path: Path) -> Run | ResultsError:
    try:
        columns, attrs = read_file(path)  # guarded: damage is an error, never a hang
    except ResultsError as exc:
        return exc
    return Run(path, columns, flatten(yaml.safe_load(attrs.get("config") or "") or {}))


def _nanfn(fn, x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(fn(x)) if x.size and not np.all(np.isnan(x)) else float("nan")


def checkpointed(run: Run) -> int | None:
    """Iterations the newest checkpoint of the run's directory holds (0: none), or None for
    a results.h5 that is not in a run directory (no config.yaml beside it)."""
    from .checkpoint import list_checkpoints

    run_dir = run.path.parent
    if not (run_dir / "config.yaml").is_file():
        return None
    found = list_checkpoints(run_dir)
    return found[-1][0] if found else 0


def iterations_text(run: Run) -> str:
    """'done/total', and where rows lack a checkpoint (a live run between checkpoints, or one
    stopped by a failed write) how far the checkpoints go: a run is complete only when both
    the rows and the checkpoint are."""
    total = run.config.get("run.iterations")
    text = f"{run.iterations}/{total}" if total else str(run.iterations)
    saved = checkpointed(run)
    if saved is not None and saved < run.iterations:
        text += f" (checkpoint {saved})" if saved else " (no checkpoint)"
    return text


def summarize(run: Run) -> dict:
    c = run.columns
    return {
        "run": run.name,
        "seed": run.config.get("run.seed", ""),
        "iterations": iterations_text(run),
        "timesteps": int(c["timesteps"][-1]) if run.iterations else 0,
        "best_eval": _nanfn(np.nanmax, c.get("eval_return", [])),
        "last_eval": float(c["eval_return"][-1]) if run.iterations else float("nan"),
        "sec_per_iter": _nanfn(np.nanmedian, c.get("iteration_seconds", [])),
    }


def format_table(rows: list[dict]) -> str:
    """Fixed-width text table of summary rows."""
    heads = ["run", "seed", "iterations", "timesteps", "best_eval", "last_eval", "sec_per_iter"]
    cells = [[_fmt(r[h]) for h in heads] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    line = lambda vals: "  ".join(  # noqa: E731
        v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(vals, widths)))
    return "\n".join([line(heads), line(["-" * w for w in widths])] + [line(c) for c in cells])


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if np.isnan(v) else f"{v:.3f}" if abs(v) < 1 else f"{v:,.2f}"
    if isinstance(v, (int, np.integer)):
        return f"{v:,d}"
    return str(v)


def write_csv(runs: list[Run], out) -> None:
    """Long format: one line per (run, iteration) with every results column."""
    names = sorted({n for r in runs for n in r.columns}, key=lambda n: (n != "iteration", n))
    w = csv.writer(out)
    w.writerow(["run", "seed"] + names)
    for r in runs:
        for i in range(r.iterations):
            w.writerow([r.name, r.config.get("run.seed", "")]
                       + [_csv_value(r.columns[n][i]) if n in r.columns else "" for n in names])


def _csv_value(v) -> str:
    return repr(float(v)) if np.asarray(v).dtype.kind == "f" else str(int(v))


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs that differ only in seed/dir/iterations form one group (the seeds of a setting).

    A group's label lists the config keys on which the groups differ.
    """
    keyed: dict[tuple, list[Run]] = {}
    for r in runs:
        key = tuple(sorted((k, repr(v)) for k, v in r.config.items() if k not in _PER_RUN_KEYS))
        keyed.setdefault(key, []).append(r)
    if len(keyed) == 1:
        (members,) = keyed.values()
        c = members[0].config
        what = " ".join(str(c[k]) for k in ("env.id", "policy.kind") if k in c) or "runs"
        return {f"{what}, {len(members)} seed{'s' if len(members) > 1 else ''}": members}
    dicts = [dict(k) for k in keyed]
    varying = sorted({k for d in dicts for k in d if len({d2.get(k) for d2 in dicts}) > 1},
                     key=lambda k: (k != "run.init_from", k))  # pretrained vs scratch first
    out = {}
    for d, members in zip(dicts, keyed.values()):
        label = ", ".join(_setting(k, d.get(k, "-")) for k in varying[:3]) or members[0].name
        out[f"{label} ({len(members)})"] = members
    return out


def _setting(key: str, value: str) -> str:
    """How a differing key reads in a legend (values are repr()s of the config's)."""
    if key == "run.init_from":  # the paper's comparison: from scratch vs pretrained
        if value in ("None", "-"):  # "-": a run from before the key existed, from scratch
            return "from scratch"
        return f"from {Path(ast.literal_eval(value)).name}"
    return f"{key}={value}"


def stacked(runs: list[Run], column: str) -> tuple[np.ndarray, np.ndarray]:
    """(iterations, values[run, iteration]) padded with NaN where a run has not got there yet."""
    n = max(r.iterations for r in runs)
    vals = np.full((len(runs), n), np.nan)
    for i, r in enumerate(runs):
        if column in r.columns:
            vals[i, :r.iterations] = r.columns[column]
    return np.arange(n), vals


def achieved_vs_target(run: Run, last: int = TARGET_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """(es.eval_targets, mean of the last `last` rows of each eval_return_target_<i>); empty
    arrays for a run without evaluation targets."""
    targets = np.asarray(run.config.get("es.eval_targets") or [], dtype=np.float64)
    cols = [run.columns.get(f"{EVAL_TARGET_PREFIX}{i}") for i in range(targets.size)]
    if not run.iterations or any(c is None for c in cols):
        return np.zeros(0), np.zeros(0)
    with _quiet():
        return targets, np.array([np.nanmean(c[-last:]) for c in cols])


def _plot_targets(ax, groups: dict[str, list[Run]], colors: list[str]) -> None:
    """Achieved against target return (median over a group's seeds), with the diagonal."""
    top = 0.0
    for color, (label, members) in zip(colors, groups.items()):
        pairs = [achieved_vs_target(r) for r in members]
        pairs = [(t, a) for t, a in pairs if t.size]
        if not pairs:
            continue
        with _quiet():
            achieved = np.nanmedian(np.array([a for _, a in pairs]), axis=0)
        ax.plot(pairs[0][0], achieved, color=color, marker="o", lw=1.6, label=label)
        top = max(top, float(np.max(pairs[0][0])), float(np.nanmax(achieved, initial=0.0)))
    ax.plot([0, top], [0, top], color="grey", ls="--", lw=1, label="achieved = target")
    ax.set(xlabel="target return (initial return-to-go)", ylabel="achieved return",
           title=f"achieved vs target (mean of the last {TARGET_ROWS} iterations)")


def plot(runs: list[Run], path: str) -> str:
    """Eval return and seconds per iteration against iteration; median and IQR over seeds.
    Runs with es.eval_targets get a third panel: achieved against target return."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "eval_return"
    if all(np.all(np.isnan(r.columns.get(metric, np.array([np.nan])))) for r in runs):
        metric = "fitness_mean"  # jobs with es.eval_episodes=0
    with_targets = any(achieved_vs_target(r)[0].size for r in runs)
    fig, axes = plt.subplots(1, 3 if with_targets else 2, figsize=(16 if with_targets else 11, 4.2))
    ax_ret, ax_sec = axes[:2]
    groups = group_runs([r for r in runs if r.iterations])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"] * 9
    for color, (label, members) in zip(colors, groups.items()):
        for ax, column in ((ax_ret, metric), (ax_sec, "iteration_seconds")):
            _plot_group(ax, members, column, color, label)
    if with_targets:
        _plot_targets(axes[2], groups, colors)
    ax_ret.set(xlabel="iteration", ylabel=metric.replace("_", " "),
               title=f"{metric.replace('_', ' ')} (median over seeds, IQR band)")
    ax_sec.set(xlabel="iteration", ylabel="seconds per iteration", title="wall-clock per iteration")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_group(ax, members: list[Run], column: str, color: str, label: str) -> None:
    """One run as a line, or several seeds as thin lines, their median and IQR band."""
    x, vals = stacked(members, column)
    if len(members) == 1:
        ax.plot(x, vals[0], color=color, lw=1.6, label=label)
        return
    for v in vals:
        ax.plot(x, v, color=color, lw=0.6, alpha=0.35)
    with np.errstate(all="ignore"), _quiet():
        q25, med, q75 = np.nanpercentile(vals, [25, 50, 75], axis=0)
    ax.fill_between(x, q25, q75, color=color, alpha=0.25, lw=0,
                    label=f"{label}: interquartile range")
    ax.plot(x, med, color=color, lw=2.2, label=f"{label}: median")


class _quiet:
    """Silence numpy's 'All-NaN slice' warnings for iterations no run has reached."""

    def __enter__(self):
        import warnings
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)



def check_outputs(args: argparse.Namespace) -> None:
    """--csv and --plot writable (and plottable), or ConfigError; leaves nothing behind."""
    from .extras import require
    from .outputs import check_writable

    if args.plot:
        require("matplotlib", "tools", "--plot")
    for flag, path in (("--csv", args.csv), ("--plot", args.plot)):
        if path not in (None, "-"):
            check_writable(flag, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m es_mpi.inspect", description=__doc__.split("\n")[0])
    p.add_argument("paths", nargs="+", help="run dirs, results.h5 files, folders or globs")
    p.add_argument("--csv", metavar="FILE.csv",
                   help="write every iteration of every run (long format); '-' for stdout")
    p.add_argument("--plot", metavar="FILE.png", help="eval return and seconds per iteration; "
                   "achieved against target return for runs with es.eval_targets")
    args = p.parse_args(argv)
    from .launch import run_tool

    return run_tool(inspect_command, args)


def inspect_command(args: argparse.Namespace) -> int:
    """Outputs checked first; the runs read (damaged files named and skipped: exit 1);
    the table, the CSV and the plot."""
    from .outputs import make_parent

    check_outputs(args)
    errors: list[str] = []
    try:
        runs = load_runs(args.paths, errors)
    except (FileNotFoundError, OSError) as exc:
        print(f"es_mpi.inspect: {exc}", file=sys.stderr)
        return 1
    for message in errors:  # damaged files: named, skipped, and the exit code says so
        print(f"es_mpi.inspect: {message}", file=sys.stderr)
    if not runs:
        return 1
    code = 1 if errors else 0
    if args.csv == "-":
        write_csv(runs, sys.stdout)
        return code
    print(format_table([summarize(r) for r in runs]))
    if args.csv:
        with open(make_parent(args.csv), "w", newline="") as fh:
            write_csv(runs, fh)
        print(f"wrote {args.csv}")
    if args.plot:
        print(f"wrote {plot(runs, make_parent(args.plot))}")
    return code


if __name__ == "__main__":
    sys.exit(main())
