"""`python -m es_mpi.collect TEACHER --episodes N --out DIR`: record a teacher's episodes as a
Minari dataset (demonstrations for es_mpi.pretrain).

TEACHER is an es_mpi checkpoint or run directory (any policy kind; it acts as in
`es_mpi.evaluate`: its own observation normalisation, no parameter or action noise, its
dropout and sampled actions seeded per episode), or with `--sb3 ALGO` a Stable-Baselines3
model file (`pip install 'es_mpi[sb3]'`) acting in the environment of `--job JOB.yaml`.

Episode i resets the environment and seeds the teacher's own randomness from (--seed, i)
only, so the dataset is the same whatever the number of ranks: `mpiexec -n K` runs K
episodes at a time and rank 0 writes them in order of i. The dataset stores raw
observations and the actions as the environment applied them (Box actions clipped to their
bounds).
"""
from __future__ import annotations

from .determinism import pin_cpu_kernels

pin_cpu_kernels()  # the teacher acts with the kernels it was trained with

import argparse  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402

from .config import ConfigError  # noqa: E402

COLLECT_SALT = 0xC011EC7


def episode_seeds(seed: int, index: int) -> tuple[int, int]:
    """(environment reset seed, the teacher's own seed) of episode `index`: from (seed, index)."""
    env_seed, own = np.random.SeedSequence([seed, index, COLLECT_SALT]).generate_state(2, np.uint64)
    return int(env_seed >> np.uint64(33)), int(own >> np.uint64(1))


@dataclass
class Teacher:
    """A policy that acts on raw observations, and the environment it acts in."""

    env: object  # gymnasium.Env
    env_cfg: object  # config.EnvConfig (recorded with the dataset)
    limit: int  # episode step limit
    reset: Callable[[int], None]  # start an episode; argument: its own seed
    act: Callable[[np.ndarray], object]  # raw observation -> action
    observe: Callable[[float], None]  # the reward of the last action
    provenance: dict  # what the teacher is (recorded with the dataset)


def es_mpi_teacher(args) -> Teacher:
    """An es_mpi checkpoint (or the newest of a run directory), acting as in evaluate."""
    from .checkpoint import CheckpointError
    from .evaluate import Evaluator, read_checkpoint

    try:
        ckpt = read_checkpoint(args.teacher)
    except (FileNotFoundError, CheckpointError) as exc:
        raise ConfigError(f"teacher: {exc}") from None
    ev = Evaluator(ckpt)
    pol = ev.policy
    return Teacher(ev.env, ev.cfg.env, ev.limit,
                   reset=lambda seed: pol.reset(None, seed=seed),
                   act=lambda obs: pol.act(ev.normalize(obs)), observe=pol.observe,
                   provenance={"kind": "es_mpi", "path": str(ckpt.path),
                               "iteration": ckpt.iteration, "policy": ev.cfg.policy.kind})


def sb3_teacher(args) -> Teacher:
    """A Stable-Baselines3 model (deterministic actions unless --stochastic, then seeded
    through torch per episode) in the environment of --job."""
    try:
        import stable_baselines3
    except ImportError:
        raise ConfigError("--sb3: needs stable-baselines3: pip install 'es_mpi[sb3]'") from None
    import torch

    from .config import load_job
    from .envs import episode_limit, make_env

    if args.job is None:
        raise ConfigError("--sb3: name the environment with --job JOB.yaml (its env section)")
    algo = getattr(stable_baselines3, args.sb3, None)
    if algo is None or not hasattr(algo, "load"):
        raise ConfigError(f"--sb3: unknown algorithm {args.sb3!r}; e.g. PPO, SAC, TD3, A2C, DQN")
    if not Path(args.teacher).is_file():
        raise ConfigError(f"teacher: no such Stable-Baselines3 model file {args.teacher!r}")
    cfg = load_job(args.job, args.overrides)
    env = make_env(cfg.env)
    model = algo.load(args.teacher, device="cpu")
    if model.observation_space.shape != env.observation_space.shape:
        raise ConfigError(f"teacher: the {args.sb3} model observes {model.observation_space}, "
                          f"{cfg.env.id} gives {env.observation_space}")
    return Teacher(env, cfg.env, episode_limit(env),
                   reset=lambda seed: torch.manual_seed(seed) if args.stochastic else None,
                   act=lambda obs: model.predict(obs, deterministic=not args.stochastic)[0],
                   observe=lambda reward: None,
                   provenance={"kind": "stable-baselines3", "algorithm": args.sb3,
                               "path": str(args.teacher), "stochastic": args.stochastic})


def build_teacher(args) -> Teacher:
    return sb3_teacher(args) if args.sb3 else es_mpi_teacher(args)


def exploration(space, noise: float, rng: np.random.Generator, action):
    """The teacher's action with exploration noise: N(0, noise^2) added to a Box action, a
    uniformly random action with probability `noise` for a Discrete one (epsilon-greedy)."""
    if noise <= 0:
        return action
    if isinstance(space, gym.spaces.Discrete):
        return int(rng.integers(space.n)) if rng.random() < noise else action
    return np.asarray(action, dtype=np.float32) + rng.normal(0, noise, np.shape(action)) \
        .astype(np.float32)


def record_episode(teacher: Teacher, env_seed: int, own_seed: int, max_steps: int,
                   noise: float = 0.0):
    """One episode of the teacher, every raw observation, applied action and reward.
    Exploration noise (drawn from the episode's own seed) shows states off the teacher's
    path; regressing on the noisy actions still learns the teacher's mean action."""
    from .demos import Episode, applied_action

    env, space = teacher.env, teacher.env.action_space
    obs, _ = env.reset(seed=env_seed)
    teacher.reset(own_seed)
    rng = np.random.Generator(np.random.PCG64([own_seed, 0x7015E]))
    observations, actions, rewards, terms, truncs = [obs], [], [], [], []
    while len(rewards) < max_steps:
        action = exploration(space, noise, rng, teacher.act(obs))
        obs, reward, terminated, truncated, _ = env.step(action)
        teacher.observe(float(reward))
        observations.append(obs)
        actions.append(applied_action(action, space))
        rewards.append(float(reward))
        terms.append(bool(terminated))
        truncs.append(bool(truncated))
        if terminated or truncated:
            break
    if not (terms[-1] or truncs[-1]):
        truncs[-1] = True  # cut short by --max-steps
    return Episode(np.stack(observations), np.stack(actions), np.array(rewards),
                   np.array(terms), np.array(truncs), seed=env_seed)


def prepare(args, is_root: bool) -> Teacher:
    """The cheap checks and the teacher (every rank); rank 0 also checks --out is free."""
    from .demos import DATA_DIR, require_minari

    require_minari()
    if args.episodes < 1:
        raise ConfigError(f"--episodes: must be at least 1, got {args.episodes}")
    if args.noise < 0:
        raise ConfigError(f"--noise: must be >= 0, got {args.noise}")
    if args.max_steps is not None and args.max_steps < 1:
        raise ConfigError(f"--max-steps: must be at least 1, got {args.max_steps}")
    if is_root and (Path(args.out) / DATA_DIR / "metadata.json").exists():
        raise ConfigError(f"--out: a dataset already exists at {args.out}; remove it or "
                          "choose another path")
    return build_teacher(args)


def open_writer(args, teacher: Teacher, cap: int, is_root: bool) -> tuple:
    """(the dataset at --out, with es_mpi's provenance in its metadata,) on rank 0, (None,)
    elsewhere; a folder that cannot be made is a ConfigError naming --out."""
    import dataclasses

    from .demos import DatasetWriter, space_summary

    if not is_root:
        return (None,)
    env = teacher.env
    metadata = {"env": dataclasses.asdict(teacher.env_cfg), "teacher": teacher.provenance,
                "seed": args.seed, "max_steps": cap, "noise": args.noise,
                "observation_space": space_summary(env.observation_space),
                "action_space": space_summary(env.action_space)}
    try:
        return (DatasetWriter(args.out, env.observation_space, env.action_space, env.spec,
                              metadata=metadata),)
    except OSError as exc:
        raise ConfigError(f"--out: cannot write the dataset at {args.out} ({exc})") from None


def collect(comm, args) -> int:
    """All ranks: rounds of `size` episodes (episode i on rank i % size); rank 0 writes."""
    from tqdm import tqdm

    from . import comm as mpi
    from .run import agree

    rank, size = comm.Get_rank(), comm.Get_size()
    teacher = agree(comm, prepare, args, rank == 0)
    if teacher is None:
        return 2
    cap = min(teacher.limit, args.max_steps or teacher.limit)
    opened = agree(comm, open_writer, args, teacher, cap, rank == 0)
    if opened is None:
        return 2
    (writer,), bar, returns, steps = opened, None, [], 0
    if rank == 0:
        bar = tqdm(total=args.episodes, desc="episodes", unit="ep", file=sys.stderr)
    for first in range(0, args.episodes, size):
        i = first + rank
        mine = record_episode(teacher, *episode_seeds(args.seed, i), cap, args.noise) \
            if i < args.episodes else None
        batch = mpi.gather_objects(comm, mine)
        if rank == 0:
            done = [ep for ep in batch if ep is not None]  # rank order = episode order
            writer.add(done)
            returns += [ep.ret for ep in done]
            steps += sum(len(ep.rewards) for ep in done)
            bar.update(len(done))
            bar.set_postfix(ret=f"{np.mean(returns):.1f}", steps=steps)
    if rank == 0:
        bar.close()
        path = writer.close()
        print(f"es_mpi.collect: {path}: {len(returns)} episodes, {steps:,} steps, return "
              f"mean {np.mean(returns):.2f} std {np.std(returns):.2f} (min {np.min(returns):.2f},"
              f" max {np.max(returns):.2f})", flush=True)
    comm.Barrier()
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m es_mpi.collect",
                                description=" ".join(__doc__.splitlines()[:2]),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("teacher", help="es_mpi checkpoint or run directory; with --sb3 a model .zip")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of --job")
    p.add_argument("--episodes", type=int, required=True, help="episodes to record")
    p.add_argument("--out", required=True, help="dataset folder to create (Minari layout)")
    p.add_argument("--seed", type=int, default=0, help="episode i is seeded by (SEED, i)")
    p.add_argument("--max-steps", type=int, help="cap on episode length (default: env limit)")
    p.add_argument("--noise", type=float, default=0.0,
                   help="exploration: std of Gaussian noise on Box actions, or the probability "
                        "of a random Discrete action (default 0: the teacher's own actions)")
    p.add_argument("--sb3", metavar="ALGO", help="TEACHER is a Stable-Baselines3 ALGO model "
                                                  "(PPO, SAC, TD3, A2C, DQN, ...)")
    p.add_argument("--job", help="with --sb3: the job whose env section to act in")
    p.add_argument("--stochastic", action="store_true",
                   help="with --sb3: sample actions (seeded per episode) instead of the mode")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from . import comm as mpi

    comm = mpi.world()
    return mpi.abort_on_exception(comm, collect, comm, args)


if __name__ == "__main__":
    sys.exit(main())
