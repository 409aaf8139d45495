"""Cost of pinning the CPU kernels (es_mpi.determinism) and proof that they matter.

Runs the per-step policy forward of the MLP and the DT (Humanoid sizes) and the Atari CNN in
fresh processes, alternating pinned (ATEN_CPU_CAPABILITY=avx2, MKL_CBWR=AVX2,
ONEDNN_MAX_CPU_ISA=AVX2) and unpinned (the libraries' own choice) rounds, and prints the
median milliseconds per step and a digest of the outputs: different digests mean different
bits, i.e. what an AVX2 node and an AVX-512 node would disagree on without pinning.

    python bench/cpu_pinning.py --rounds 5
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from tqdm import tqdm

SETTINGS = {
    "pinned": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "unpinned": {"ATEN_CPU_CAPABILITY": "", "MKL_CBWR": "", "ONEDNN_MAX_CPU_ISA": ""},
}

PROBE = r"""
import hashlib, json, sys, time
import gymnasium as gym, numpy as np, torch
torch.set_num_threads(1)
from es_mpi.config import PolicyConfig
from es_mpi.policies import make_policy
steps = int(sys.argv[1])
cases = {
    "mlp": (PolicyConfig(kind="mlp"), gym.spaces.Box(-np.inf, np.inf, (376,)), gym.spaces.Box(-0.4, 0.4, (17,))),
    "dt": (PolicyConfig(kind="dt"), gym.spaces.Box(-np.inf, np.inf, (376,)), gym.spaces.Box(-0.4, 0.4, (17,))),
    "cnn": (PolicyConfig(kind="cnn"), gym.spaces.Box(0, 255, (4, 84, 84), np.uint8), gym.spaces.Discrete(18)),
}
out = {"capability": torch.backends.cpu.get_cpu_capability()}
rng = np.random.default_rng(0)
for name, (cfg, obs_space, act_space) in cases.items():
    pol = make_policy(cfg, obs_space, act_space, 0)
    n = steps if name != "cnn" else steps // 10
    obs = (rng.integers(0, 255, (n, *obs_space.shape), dtype=np.uint8) if name == "cnn"
           else rng.normal(size=(n, *obs_space.shape)).astype(np.float32))
    pol.reset()
    h = hashlib.blake2b(digest_size=6)
    t0 = time.perf_counter()
    for o in obs:
        if name == "cnn":  # the logits: an argmax would hide differences in the last bits
            a = pol.forward(torch.from_numpy(o)[None]).numpy()
        else:
            a = pol.act(o)
            pol.observe(1.0)
        h.update(np.asarray(a, dtype=np.float32).tobytes())
    out[name] = [(time.perf_counter() - t0) / n * 1e3, h.hexdigest()]
print(json.dumps(out))
"""


def probe(setting: str, steps: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for var, value in SETTINGS[setting].items():
        if value:
            env[var] = value
        else:
            env.pop(var, None)
    out = subprocess.run([sys.executable, "-c", PROBE, str(steps)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds per setting")
    ap.add_argument("--steps", type=int, default=500, help="policy steps per probe (cnn: /10)")
    args = ap.parse_args()
    results: dict[str, list[dict]] = {s: [] for s in SETTINGS}
    for _ in tqdm(range(args.rounds), desc="rounds"):
        for setting in SETTINGS:
            results[setting].append(probe(setting, args.steps))
    print(f"{'setting':9s} {'torch':8s} " + " ".join(f"{k + ' ms/step':>14s} {'digest':>12s}"
                                                    for k in ("mlp", "dt", "cnn")))
    for setting, runs in results.items():
        cells = []
        for k in ("mlp", "dt", "cnn"):
            times = sorted(r[k][0] for r in runs)
            digests = {r[k][1] for r in runs}
            cells.append(f"{times[len(times) // 2]:14.3f} {'/'.join(sorted(digests)):>12s}")
        print(f"{setting:9s} {runs[0]['capability']:8s} " + " ".join(cells))


if __name__ == "__main__":
    main()
