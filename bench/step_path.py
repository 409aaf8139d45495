"""Env steps per second per rank: a raw loop against the es_mpi training path, per env/policy.

    flock -x /tmp/es_mpi_cpu.lock mpiexec -n 1 python bench/step_path.py [--seconds 20]
    flock -x /tmp/es_mpi_cpu.lock mpiexec -n 2 python bench/step_path.py --cases cheetah,dt

raw loop   the training path's own episodes (its current theta +- sigma eps_j, reset seeds
           and episode cap; see RawLoop) on `env.unwrapped`, the TimeLimit counted by hand,
           the observation normalisation folded into the first layer, and the leanest forward
           of the policy: for the MLP both its own act() (torch, the lean path) and a NumPy
           forward are timed and the faster counts; for the DT its act() (with the job's
           dropout). No ES bookkeeping, no per-step normalisation, no wrappers.
training   real ES iterations through `es_mpi.iteration.run_iteration` (perturbation, normalisation,
           rollouts, Allgatherv, noise sum and update), small population, no evaluation
           episodes; steps are this rank's share of the iteration's env steps.
The loops run in alternating rounds in one process per rank, so drifting load hits them
alike; every rank runs at once. Cases: the paper sizes (Humanoid MLP 256-256; 64-64 for
HalfCheetah and Hopper) and the Humanoid DT of jobs/humanoid_dt.yaml.
"""
from __future__ import annotations

import os  # noqa: F401

from es_mpi.determinism import pin_cpu_kernels

pin_cpu_kernels()  # as es_mpi.run: one thread per rank, the same CPU kernels

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from es_mpi import comm as mpi  # noqa: E402
from es_mpi.config import load_job  # noqa: E402
from es_mpi.envs import episode_limit, make_env  # noqa: E402
from es_mpi.es import adaptive_episode_cap  # noqa: E402
from es_mpi.noise import iteration_draws  # noqa: E402
from es_mpi.runtime import build_policy  # noqa: E402
from throughput import ESPath  # noqa: E402  (bench/, next to this script)

warnings.filterwarnings("ignore", message=".*is out of date")  # Humanoid-v4: the paper's env

MLP = "jobs/humanoid_mlp.yaml"
CASES = {  # label -> (job file, overrides)
    "cheetah": (MLP, ["env.id=HalfCheetah-v5", "policy.hidden=[64,64]"]),
    "hopper": (MLP, ["env.id=Hopper-v5", "policy.hidden=[64,64]"]),
    "humanoid5": (MLP, ["env.id=Humanoid-v5"]),
    "humanoid4": (MLP, []),
    "dt": ("jobs/humanoid_dt.yaml", []),
}


def numpy_forward(policy):
    """The MLP's forward in NumPy (its own BLAS, other bits) into preallocated buffers."""
    layers = [(m.weight.numpy(), m.bias.numpy(), np.zeros(m.out_features, np.float32))
              for m in policy.net if isinstance(m, torch.nn.Linear)]
    x = np.zeros(layers[0][0].shape[1], np.float32)
    head = policy.head

    def forward(obs):
        x[:] = obs
        h = x
        for i, (w, b, out) in enumerate(layers):
            np.dot(w, h, out=out)
            out += b
            if i < len(layers) - 1:
                np.tanh(out, out=out)
            h = out
        return head(torch.from_numpy(h))

    return forward


class RawLoop:
    """The training path's current episodes run bare: its theta +- sigma eps_j (this rank's
    pairs of its current iteration, then the next iteration's draws at the same theta), reset
    seeds and episode cap, on `env.unwrapped` with the TimeLimit counted here and the
    observation normalisation folded into the first layer (the DT's state embedding), so the
    same policies visit the same kind of states at no per-step cost but the forward's."""

    def __init__(self, es: ESPath, forward: str):
        self.es, cfg = es, es.cfg
        env = make_env(cfg.env)
        self.env, self.limit = env.unwrapped, episode_limit(env)
        self.policy = build_policy(cfg, env)
        self.act = numpy_forward(self.policy) if forward == "numpy" else self.policy.act
        net = self.policy.model.embed_state if cfg.policy.kind == "dt" else self.policy.net[0]
        self.first = (net.weight, net.bias)
        self.std = np.float32(cfg.policy.action_noise_std)  # N(0, std^2) on every action
        self.draw = 0

    def episodes(self):
        """(eps, sign, reset seed, cap) of this rank's episodes, endlessly."""
        cfg, state, comm = self.es.cfg, self.es.state, self.es.comm
        table, dim = self.es.rt.noise.table, state.theta.size
        cap = adaptive_episode_cap(self.limit, state.prev_lengths, cfg.es.episode_cap_factor)
        lo, hi = mpi.split_range(cfg.es.population, comm.Get_size(), comm.Get_rank())
        while True:
            d = iteration_draws(cfg.run.seed, state.iteration + self.draw, cfg.es.population,
                                table.size, dim, 0.0, 0, cfg.es.env_seeds)
            self.draw += 1
            for j in range(lo, hi):
                for s, sign in enumerate((1.0, -1.0)):
                    eps = table[d.offsets[j]: d.offsets[j] + dim]
                    yield eps, sign, int(d.env_seeds[j, s]), cap

    def fold_normalisation(self) -> None:
        """W x + b on (obs - mean) / std  ->  (W / std) obs + (b - (W / std) mean)."""
        stats, env_cfg = self.es.state.obs_stats, self.es.cfg.env
        mean = torch.from_numpy(stats.mean.astype(np.float32))
        inv_std = torch.from_numpy((1.0 / stats.std(env_cfg.obs_var_floor)).astype(np.float32))
        w, b = self.first
        w.mul_(inv_std)
        b.sub_(torch.mv(w, mean))

    def clipped(self, act):
        """act() on the observation normalised and clipped (Salimans et al.'s policy does
        both in its forward), into one buffer."""
        from es_mpi.rollout import make_normalizer

        normalize = make_normalizer(self.es.cfg.env, self.es.state.obs_stats)
        buf = np.empty(self.env.observation_space.shape, np.float32)
        return lambda obs: act(normalize(obs, buf))

    def action_noise(self, seed: int) -> np.random.Generator | None:
        """The episode's action-noise generator when the job adds noise to its actions."""
        return np.random.default_rng(seed) if self.std > 0 else None

    def run(self, seconds: float) -> tuple[int, float]:
        env, policy, act, theta = self.env, self.policy, self.act, self.es.state.theta
        sigma, env_cfg = self.es.cfg.es.sigma, self.es.cfg.env
        fold = env_cfg.normalize_obs and env_cfg.obs_clip is None
        if env_cfg.normalize_obs and not fold:  # a clip cannot be folded: part of the policy
            act = self.clipped(act)
        steps, start, self.draw = 0, time.perf_counter(), 0
        for eps, sign, seed, cap in self.episodes():
            if time.perf_counter() - start >= seconds:
                break
            policy.set_perturbed(theta, eps, sign * sigma)
            if fold:
                self.fold_normalisation()
            obs, _ = env.reset(seed=seed)
            policy.reset(seed=seed)  # the DT's return-to-go and dropout generator
            noise = self.action_noise(seed)
            for _ in range(min(cap, self.limit)):
                action = act(obs)
                if noise is not None:  # Salimans et al.'s N(0, 0.01^2) on every action
                    action = action + noise.standard_normal(action.shape, np.float32) * self.std
                obs, reward, term, trunc, _ = env.step(action)
                policy.observe(float(reward))
                steps += 1
                if term or trunc:
                    break
        return steps, time.perf_counter() - start


def bench(label: str, args, comm) -> None:
    job, overrides = CASES[label]
    cfg = load_job(REPO / job, overrides + [
        f"es.population={args.population}", "es.noise_table_size=20000000",
        "es.eval_episodes=0", "run.dir=/tmp/es_mpi_bench"])
    rank = comm.Get_rank()
    forwards = ["torch", "numpy"] if cfg.policy.kind == "mlp" else ["torch"]
    training = ESPath(cfg, comm)
    loops = {f"raw {f}": RawLoop(training, f) for f in forwards}
    loops["training"] = training
    totals = {name: np.zeros(2) for name in loops}  # steps, seconds
    for _ in range(args.rounds):  # alternate, so drifting machine load hits all alike
        for name, loop in loops.items():
            totals[name] += loop.run(args.seconds / args.rounds)
            comm.Barrier()
    rates = comm.gather({name: t[0] / t[1] for name, t in totals.items()})
    if rank == 0:
        mean = {name: float(np.mean([r[name] for r in rates])) for name in loops}
        raw = max(v for k, v in mean.items() if k.startswith("raw"))
        size = f"MLP {cfg.policy.hidden}" if cfg.policy.kind == "mlp" else "DT"
        cells = " | ".join(f"{mean.get(f'raw {f}', float('nan')):,.0f}" for f in ("torch", "numpy"))
        print(f"| {cfg.env.id} {size} | {comm.Get_size()} | {cells} | {mean['training']:,.0f} | "
              f"{100 * mean['training'] / raw:.1f} % | {loops['training'].iterations} |",
              flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    p.add_argument("--seconds", type=float, default=20.0, help="per loop and case")
    p.add_argument("--rounds", type=int, default=5, help="alternating measurement rounds")
    p.add_argument("--population", type=int, default=8, help="mirrored pairs per iteration")
    args = p.parse_args()
    torch.set_num_threads(1)
    comm = mpi.world()
    if comm.Get_rank() == 0:
        print(f"steps/s per rank; torch {torch.__version__}, {args.rounds} rounds x "
              f"{args.seconds / args.rounds:.1f} s per loop, population {args.population} pairs")
        print("| env, policy | ranks | raw: act() | raw: NumPy forward | training path | "
              "ratio (vs faster raw) | ES iterations |\n|---|---|---|---|---|---|---|")
    for label in args.cases.split(","):
        bench(label, args, comm)


if __name__ == "__main__":
    main()
