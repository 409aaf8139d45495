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
                   provenance={"kind": "es_mpi", "path": str(Path(ckpt.path).absolute()),
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
                               "path": str(Path(args.teacher).absolute()),
                               "stochastic": args.stochastic})


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
    """The cheap checks and the teacher (every rank)."""
    from .demos import require_minari

    require_minari()
    for option, value, least in (("--episodes", args.episodes, 1), ("--seed", args.seed, 0),
                                 ("--max-steps", args.max_steps, 1)):
        if value is not None and value < least:
            raise ConfigError(f"{option}: must be at least {least}, got {value}")
    if args.noise < 0:
        raise ConfigError(f"--noise: must be >= 0, got {args.noise}")
    return build_teacher(args)


def collection_metadata(args, teacher: Teacher, cap: int) -> dict:
    """What the dataset records of how it was made (es_mpi_* keys); a rerun must match it
    to continue an interrupted collection."""
    import dataclasses

    from .demos import space_summary

    env = teacher.env
    return {"env": dataclasses.asdict(teacher.env_cfg), "teacher": teacher.provenance,
            "seed": args.seed, "max_steps": cap, "noise": args.noise, "episodes": args.episodes,
            "observation_space": space_summary(env.observation_space),
            "action_space": space_summary(env.action_space)}


def differences(recorded: dict, metadata: dict) -> list[str]:
    """The keys of `metadata` whose recorded value (es_mpi_<key>, JSON) differs."""
    import json

    out = []
    for key, now in metadata.items():
        raw = recorded.get(f"es_mpi_{key}")
        then = None if raw is None else json.loads(raw)
        if then != json.loads(json.dumps(now)):
            out.append(f"{key}: {json.dumps(then)} in the dataset, {json.dumps(now)} now")
    return out


def resume_point(out: Path, recorded: dict, metadata: dict) -> int | None:
    """Episodes already written by an interrupted run of this same command (None: the
    dataset is complete); ConfigError if the dataset is another command's or not ours."""
    from .demos import COMPLETE_KEY

    state = recorded.get(COMPLETE_KEY)
    if state is None:
        raise ConfigError(f"--out: {out} holds a Minari dataset not made by es_mpi.collect; "
                          "pass --overwrite to replace it, or choose another --out")
    differ = "; ".join(differences(recorded, metadata))
    n = int(recorded.get("total_episodes", 0))
    if state == "true" and differ:
        raise ConfigError(f"--out: a dataset already exists at {out}, collected with other "
                          f"settings ({differ}); pass --overwrite to replace it, or choose "
                          "another --out")
    if differ:
        raise ConfigError(f"--out: {out} holds an interrupted collection ({n} episodes) of "
                          f"other settings ({differ}); rerun its command to finish it, or pass"
                          " --overwrite to start afresh")
    return None if state == "true" else n


def open_writer(args, teacher: Teacher, cap: int, is_root: bool) -> tuple:
    """(writer, first episode to record) on rank 0: a new dataset at --out, or the one an
    interrupted run of the same command left (continued), or (None, --episodes) if that one
    is complete; (None, 0) elsewhere. A folder that cannot be made is a ConfigError."""
    from .demos import DATA_DIR, DatasetWriter, read_dataset_metadata, remove_dataset

    if not is_root:
        return None, 0
    out, metadata = Path(args.out).absolute(), collection_metadata(args, teacher, cap)
    try:
        if args.overwrite and (out / DATA_DIR).is_dir():
            remove_dataset(out)
        recorded = read_dataset_metadata(out)
        start = 0 if recorded is None else resume_point(out, recorded, metadata)
        if start is None:
            return None, args.episodes
        if start > 0:
            return DatasetWriter.reopen(out), start
        if recorded is not None:
            remove_dataset(out)  # interrupted before its first episode: nothing to keep
        env = teacher.env
        return DatasetWriter(out, env.observation_space, env.action_space, env.spec,
                             metadata=metadata), 0
    except OSError as exc:
        raise ConfigError(f"--out: cannot write the dataset at {out} ({exc})") from None


def record_rounds(comm, args, teacher: Teacher, cap: int, writer, start: int) -> None:
    """Episodes start.. in rounds of `size` (episode i on rank i % size); rank 0 writes
    each round in order of i, so a run stopped at any point can be continued."""
    from . import comm as mpi
    from .progress import progress

    rank, size = comm.Get_rank(), comm.Get_size()
    bar = progress(args.episodes, "collect", "episodes", initial=start) if rank == 0 else None
    for first in range(start, args.episodes, size):
        i = first + rank
        mine = record_episode(teacher, *episode_seeds(args.seed, i), cap, args.noise) \
            if i < args.episodes else None
        batch = mpi.gather_objects(comm, mine)
        if rank == 0:
            done = [ep for ep in batch if ep is not None]  # rank order = episode order
            writer.add(done)
            bar.update(len(done))
            bar.set_postfix(ret=f"{np.mean(writer.returns):.1f}",
                            steps=writer.storage.total_steps, refresh=False)
    if rank == 0:
        bar.close()


def collect(comm, args) -> int:
    """All ranks: check, open (or continue) the dataset, record; rank 0 writes."""
    from . import comm as mpi
    from .run import agree

    rank = comm.Get_rank()
    teacher = agree(comm, prepare, args, rank == 0)
    if teacher is None:
        return 2
    cap = min(teacher.limit, args.max_steps or teacher.limit)
    opened = agree(comm, open_writer, args, teacher, cap, rank == 0)
    if opened is None:
        return 2
    writer, start = opened
    start = int(mpi.broadcast_array(comm, np.array([start]) if rank == 0 else None)[0])
    out = Path(args.out).absolute()
    if rank == 0 and start >= args.episodes:
        print(f"es_mpi.collect: {out}: already complete ({args.episodes} episodes); nothing "
              "to do", flush=True)
    elif rank == 0 and start > 0:
        print(f"es_mpi.collect: {out}: continuing an interrupted collection at episode "
              f"{start} of {args.episodes}", flush=True)
    if start < args.episodes:
        record_rounds(comm, args, teacher, cap, writer, start)
        if rank == 0:
            print(summary(writer), flush=True)
    comm.Barrier()
    return 0


def summary(writer) -> str:
    """Close the dataset (marked complete); one line about it."""
    path, returns = writer.close(), writer.returns
    return (f"es_mpi.collect: {path}: {len(returns)} episodes, {writer.storage.total_steps:,} "
            f"steps, return mean {np.mean(returns):.2f} std {np.std(returns):.2f} (min "
            f"{np.min(returns):.2f}, max {np.max(returns):.2f})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m es_mpi.collect",
                                description=" ".join(__doc__.splitlines()[:2]),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("teacher", help="es_mpi checkpoint or run directory; with --sb3 a model .zip")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of --job")
    p.add_argument("--episodes", type=int, required=True, help="episodes to record")
    p.add_argument("--out", required=True,
                   help="dataset folder to create (Minari layout); the same command again "
                        "continues an interrupted collection")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a dataset already at --out (complete or not)")
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

    from .launch import run_tool

    comm = mpi.world()  # alone, run_tool names a known error; else abort_on_exception does
    return run_tool(mpi.abort_on_exception, comm, collect, comm, args)


if __name__ == "__main__":
    sys.exit(main())
