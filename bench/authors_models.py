"""The authors' published Humanoid models, converted (es_mpi.convert) and evaluated at full
length by es_mpi.evaluate, next to the returns the authors logged for them.

    python bench/authors_models.py [--episodes 10] [--rtg -1000,0,1000,3000,6000,10000,1000000]

Models: tests/data/ (Lorenc's `es_contra_dt` repository, MIT; tests/data/README.md): the
final MLP of their run es_ff_humanoid_1 (200 iterations) and the final DT of es_dt_humanoid_1
(140 iterations), with es_mpi's defaults for jobs/humanoid_mlp.yaml and jobs/humanoid_dt.yaml
(the DT at policy.target_return 6000, dropout active as in their evaluations). Episodes i =
0..N-1 start from reset(seed + i), 1,000 steps at most. Then the DT's return at each initial
return-to-go of --rtg (Lorenc & Neruda's Table I), and the same for their behaviour-cloned
DT (`pretrained_ckpts/humanoid.ckpt`, raw observations), the start of their pretraining
runs. The numbers go to docs/fidelity.md by hand.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from es_mpi.evaluate import parse_table

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
# Their plots (data/main_experiments_data/es_{ff,dt}_humanoid/*_eval.png, run 1, read off
# the curve): the mean return of their 10 evaluation episodes at the last iteration, in
# thousands; the per-iteration logs themselves (logs.zip) are not in the repository
LOGGED = {"es_ff_humanoid_1": ("mlp, iteration 200", 7.6),
          "es_dt_humanoid_1": ("dt, iteration 140", 4.9)}


def run(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} exited {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc.stdout


def convert(model: Path, out: Path) -> Path:
    run("-m", "es_mpi.convert", str(model), "--out", str(out))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rtg", default="-1000,0,1000,3000,6000,10000,1000000")
    args = p.parse_args()
    ev = ("--episodes", str(args.episodes), "--seed", str(args.seed))
    with tempfile.TemporaryDirectory() as tmp:
        files = {name: convert(DATA / f"{name}.model", Path(tmp) / f"{name}.h5")
                 for name in LOGGED}
        print(f"{'run':>18}  {'what':>18}  {'es_mpi return':>14}  {'std':>8}  "
              f"{'length':>7}  {'authors (plot)':>14}  {'ratio':>6}")
        for name, (what, logged) in LOGGED.items():
            row = parse_table(run("-m", "es_mpi.evaluate", str(files[name]), *ev))[0]
            mean, std, length = row["return mean"], row["return std"], row["length mean"]
            print(f"{name:>18}  {what:>18}  {float(mean):14.1f}  {float(std):8.1f}  "
                  f"{float(length):7.1f}  {logged * 1000:14.0f}  "
                  f"{float(mean) / (logged * 1000):6.3f}", flush=True)
        print(f"\nTable I, es_dt_humanoid_1 ({args.episodes} episodes per row):")
        print(run("-m", "es_mpi.evaluate", str(files["es_dt_humanoid_1"]), *ev,
                  f"--rtg={args.rtg}"), flush=True)
        bc = convert(DATA / "humanoid_bc.ckpt", Path(tmp) / "humanoid_bc.h5")
        print("Table I, their behaviour-cloned DT (humanoid_bc.ckpt):")
        print(run("-m", "es_mpi.evaluate", str(bc), *ev, f"--rtg={args.rtg}"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
