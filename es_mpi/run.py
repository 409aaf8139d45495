"""`python -m es_mpi.run JOB.yaml [section.key=value ...]`: the SPMD training loop.

Every rank runs this same loop (no master): evaluate its share of the mirrored pairs, gather
the scalars keyed by pair index j, rebuild every eps_j from the shared noise table and apply
the same update, so theta stays bitwise identical everywhere without being sent.
"""
from __future__ import annotations

from .determinism import pin_cpu_kernels

pin_cpu_kernels()  # one thread per rank, same kernels on every node: before numpy/torch

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from .config import ConfigError, JobConfig, load_job  # noqa: E402
from .launch import (EXIT_CONFIG_ERROR, EXIT_LAUNCHER_ERROR, EXIT_OK,  # noqa: E402
                     EXIT_PREEMPTED, PreemptionFlag, check_launcher)
from .resume import (RESUME_IGNORED_KEYS, ResumeRefused, check_compatible,  # noqa: E402
                     checkpoint_on_preemption, resume_or_start, write_checkpoint)

EPILOG = f"""\
Run directory: run.dir/config.yaml, results.h5, checkpoints/ckpt_NNNNNN.h5.
Running the same command again resumes from the newest checkpoint that passes its checksum
(corrupt ones are reported and skipped) and recomputes, bitwise identically, the iterations
after it. A config that differs from the checkpoint's in anything but
{", ".join(RESUME_IGNORED_KEYS)}
is refused unless --force. A run that is already complete exits 0 at once. Only one run at a
time may use a run.dir (rank 0 holds run.dir/.lock); a second one is refused with exit 2.

Exit codes:
  {EXIT_OK}  done (run.iterations reached; also when it already was at start)
  {EXIT_CONFIG_ERROR}  configuration error, or resume refused
  {EXIT_PREEMPTED}  preempted: SIGTERM or SIGUSR1 reached at least one rank (MPICH's mpiexec
     forwards both to every rank); at the next iteration boundary all ranks agreed, rank 0
     wrote a checkpoint and every rank exited {EXIT_PREEMPTED}. Re-run the same command to resume.
  {EXIT_LAUNCHER_ERROR}  launcher error: SLURM started N>1 tasks but this MPI world has one rank
     (plain `srun` without a PMI plugin); nothing was trained
  1  any other failure (the whole job is aborted)
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m es_mpi.run", description=__doc__.splitlines()[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job", help="job YAML file, e.g. jobs/quickstart.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. es.sigma=0.05")
    p.add_argument("--force", action="store_true",
                   help="resume even if the config differs from the checkpoint's, or start "
                        "over when run.dir holds checkpoints but none is valid")
    return p.parse_args(argv)


def agree(comm, step, *args):
    """Run `step(*args)` on every rank; if it raises ConfigError anywhere, all ranks return None.

    Bad input is reported once (by the lowest failing rank), with exit code 2 and no traceback,
    and no rank is left waiting in a collective for one that failed.
    """
    from . import comm as mpi

    result, error = None, None
    try:
        result = step(*args)
    except ConfigError as exc:
        error = str(exc)
    first_failed = mpi.first_failing_rank(comm, error is not None)
    if first_failed is not None:
        if comm.Get_rank() == first_failed:
            print(f"es_mpi: configuration error: {error}", file=sys.stderr, flush=True)
        return None
    return result


@dataclass
class Runtime:
    """What one rank builds once: environment, policy, shared noise table."""

    env: object
    policy: object
    noise: object  # comm.SharedTable
    episode_limit: int
    obs_shape: tuple
    node_sum: object = None  # comm.NodeSum for run.update node_split, else None


def preflight(cfg: JobConfig, is_root: bool):
    """The cheap checks, before torch is imported: run.dir (rank 0, which alone writes it) and
    the environment (every rank; an unknown env.id or a bad env.kwargs raises ConfigError).
    Returns the environment, which the run then uses."""
    from .envs import make_env
    from .resume import check_run_dir

    if is_root:
        check_run_dir(Path(cfg.run.dir))
    return make_env(cfg.env)


def build_policy(cfg: JobConfig, env):
    """The policy for `env` (imports torch); a noise table smaller than theta, or VBN asked
    of a policy without VBN layers, raises ConfigError."""
    import torch

    from .policies import make_policy

    torch.set_num_threads(cfg.run.torch_threads)
    try:
        policy = make_policy(cfg.policy, env.observation_space, env.action_space, cfg.run.seed,
                             obs_normalized=cfg.env.normalize_obs)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if policy.num_params > cfg.es.noise_table_size:
        raise ConfigError(f"es.noise_table_size={cfg.es.noise_table_size} is smaller than the "
                          f"policy's {policy.num_params:,} parameters")
    if cfg.policy.vbn:
        from .policies.vbn import uses_vbn
        if not uses_vbn(policy):
            raise ConfigError(f"policy.vbn: policy {cfg.policy.kind!r} has no VBN layers")
    from .init_from import check_init_from
    check_init_from(cfg, env, policy)  # run.init_from loads and fits (ConfigError otherwise)
    return policy


def build_env_and_policy(cfg: JobConfig) -> tuple:
    """The rank-local part of set-up (no MPI): bad ids or sizes raise ConfigError."""
    from .envs import make_env

    env = make_env(cfg.env)
    return env, build_policy(cfg, env)


def warn_if_mixed_kernels(comm) -> None:
    """Rank 0 warns when ranks run different CPU kernels (then a return may depend on the node
    that computed it, and theta on the rank count); see es_mpi/determinism.py."""
    from .determinism import cpu_kernels

    kinds = comm.gather(cpu_kernels(), root=0)
    if comm.Get_rank() == 0 and len(set(kinds)) > 1:
        where = "; ".join(f"{k}: ranks {[r for r, x in enumerate(kinds) if x == k]}"
                          for k in sorted(set(kinds)))
        print(f"es_mpi: WARNING: ranks run different CPU kernels ({where}); episode returns "
              "may depend on the node, so theta is no longer independent of the rank count. "
              "Set ATEN_CPU_CAPABILITY and MKL_CBWR to one value everywhere.", file=sys.stderr,
              flush=True)


def build_runtime(cfg: JobConfig, comm, env=None, policy=None) -> Runtime:
    """Environment, policy and the node-shared noise table (collective over `comm`)."""
    from . import comm as mpi
    from .envs import episode_limit

    if env is None:
        env, policy = build_env_and_policy(cfg)
    warn_if_mixed_kernels(comm)
    shared = mpi.shared_noise_table(comm, cfg.es.noise_table_size, cfg.es.noise_seed)
    node_sum = (mpi.NodeSum.allocate(comm, policy.num_params)
                if cfg.run.update == "node_split" else None)
    return Runtime(env, policy, shared, episode_limit(env), env.observation_space.shape,
                   node_sum)


def initial_state(rt: Runtime, cfg: JobConfig | None = None):
    """A fresh start: the policy's theta from run.seed, or run.init_from's theta and
    observation statistics (a pretrained policy)."""
    from .checkpoint import TrainState
    from .es import ObsStats, OptimizerState

    theta, stats = rt.policy.get_theta(), ObsStats.empty(rt.obs_shape)
    if cfg is not None and cfg.run.init_from is not None:
        from .init_from import load_initial
        theta, stats = load_initial(cfg, rt.env, rt.policy)
    return TrainState(0, theta, OptimizerState.zeros(theta.size), stats,
                      prev_lengths=np.zeros(0, dtype=np.int64))


def prepare_vbn(cfg: JobConfig, comm, rt: Runtime, state) -> None:
    """Virtual batch norm: give the policy its reference batch (no-op unless policy.vbn).

    A resumed state brings the batch in `state.extras['vbn_reference']`; otherwise rank 0
    collects it with a random policy seeded by run.seed alone and broadcasts it, and it is
    stored in the extras so checkpoints carry it. Every rank checks it holds the same bytes.
    """
    if not cfg.policy.vbn:
        return
    from . import comm as mpi
    from .envs_atari import random_policy_observations
    from .policies.vbn import EXTRAS_KEY, set_vbn_reference

    ref = state.extras.get(EXTRAS_KEY)
    if ref is None:
        if comm.Get_rank() == 0:
            ref = random_policy_observations(rt.env, cfg.run.seed, cfg.policy.vbn_batch)
        ref = mpi.broadcast_array(comm, ref)
        state.extras[EXTRAS_KEY] = ref
    mpi.check_identical(comm, ref, state.iteration - 1, what="VBN reference batch")
    set_vbn_reference(rt.policy, ref)  # build_env_and_policy checked that it has VBN layers


def _gather_obs_stats(comm, recorded: list, obs_space, stats) -> None:
    """Add the recorded episodes' observation sums of every rank to `stats`, identically on
    every rank. `recorded` holds (key, EpisodeResult) with key = 2j + sign.

    Integer frames (Atari) have integer sums, exact in int64 in any order: one Allreduce.
    Float observations are added one episode at a time in order of key (float64 addition is
    not associative), after an Allgatherv of the per-episode sums.
    """
    from . import comm as mpi

    shape, width = obs_space.shape, int(np.prod(obs_space.shape))
    if np.issubdtype(obs_space.dtype, np.integer):
        total = np.zeros(2 * width + 1, dtype=np.int64)
        for _, res in recorded:
            total += np.concatenate([[res.obs_count], res.obs_sum.ravel(), res.obs_sumsq.ravel()])
        total = mpi.allreduce_sum(comm, total)
        if total[0]:
            stats.add(total[1:1 + width].reshape(shape).astype(np.float64),
                      total[1 + width:].reshape(shape).astype(np.float64), float(total[0]))
        return
    rows = [np.concatenate([[key, res.obs_count], res.obs_sum.ravel(), res.obs_sumsq.ravel()])
            for key, res in recorded]
    for row in mpi.gather_by_key(comm, np.array(rows).reshape(-1, 2 + 2 * width)):
        stats.add(row[2:2 + width].reshape(shape), row[2 + width:].reshape(shape), row[1])


def run_iteration(cfg: JobConfig, comm, rt: Runtime, state) -> tuple[object, dict]:
    """One ES iteration on this rank; returns the new state (same on all ranks) and a row."""
    from . import comm as mpi
    from . import es
    from .noise import EVAL_EPISODE, TRAIN_EPISODE, episode_seed, iteration_draws
    from .rollout import make_normalizer, run_episode

    t0 = time.perf_counter()
    rank, size, dim, n = comm.Get_rank(), comm.Get_size(), state.theta.size, cfg.es.population
    seed, t, table = cfg.run.seed, state.iteration, rt.noise.table
    draws = iteration_draws(seed, t, n, table.size, dim,
                            cfg.env.obs_stat_prob if cfg.env.normalize_obs else 0.0,
                            cfg.es.eval_episodes, cfg.es.env_seeds)
    common = cfg.es.env_seeds == "per_iteration"  # the population shares its randomness too
    cap = es.adaptive_episode_cap(rt.episode_limit, state.prev_lengths, cfg.es.episode_cap_factor)
    norm = make_normalizer(cfg.env, state.obs_stats)

    # --- rollouts: this rank's pairs j in [lo, hi), both signs on the same env seed
    lo, hi = mpi.split_range(n, size, rank)
    pair_rows, recorded = [], []
    for j in range(lo, hi):
        eps = table[draws.offsets[j]: draws.offsets[j] + dim]
        out = []
        for s, sign in enumerate((1.0, -1.0)):
            rt.policy.set_perturbed(state.theta, eps, sign * cfg.es.sigma)
            res = run_episode(rt.env, rt.policy, draws.env_seeds[j, s], cap, norm,
                              bool(draws.record_obs[j, s]),
                              episode_seed=episode_seed(seed, t, TRAIN_EPISODE,
                                                        0 if common else j, s),
                              action_noise_std=cfg.policy.action_noise_std)
            out.append(res)
            if res.obs_count:
                recorded.append((2 * j + s, res))
        pair_rows.append([j, out[0].ret, out[1].ret, out[0].length, out[1].length])
    eval_rows = []
    rt.policy.set_theta(state.theta)
    for e in range(rank, cfg.es.eval_episodes, size):  # no action noise (OpenAI's evaluation)
        res = run_episode(rt.env, rt.policy, draws.eval_seeds[e], rt.episode_limit, norm,
                          episode_seed=episode_seed(seed, t, EVAL_EPISODE, e, 0))
        eval_rows.append([e, res.ret, res.length])
    t1 = time.perf_counter()

    # --- exchange scalars (and the few recorded obs sums), keyed by j
    pairs = mpi.gather_by_key(comm, np.array(pair_rows).reshape(-1, 5), n)
    evals = mpi.gather_by_key(comm, np.array(eval_rows).reshape(-1, 3), cfg.es.eval_episodes)
    stats = state.obs_stats
    _gather_obs_stats(comm, recorded, rt.env.observation_space, stats)
    t2 = time.perf_counter()

    # --- the same update on every rank, summed in order of j
    ret_pos, ret_neg = pairs[:, 1], pairs[:, 2]
    weights = es.fitness_weights(ret_pos, ret_neg, cfg.es.fitness_shaping, cfg.es.tie_break)
    if rt.node_sum is None:
        noise_sum = es.weighted_noise_sum(table, draws.offsets, weights, 0, dim)
    else:  # each rank of the node a range of coordinates: the same bits, node-parallel
        noise_sum = rt.node_sum.combine(
            lambda lo, hi: es.weighted_noise_sum(table, draws.offsets, weights, lo, hi))
    grad = es.gradient_estimate(noise_sum, n, cfg.es.sigma, cfg.es.divide_by_sigma,
                                cfg.es.grad_divisor)
    theta, opt = es.es_update(state.theta, grad, state.opt, cfg.es)
    t3 = time.perf_counter()

    lengths = pairs[:, 3:5].astype(np.int64).ravel()
    returns = pairs[:, 1:3].ravel()
    iteration_seconds = t3 - t0
    theta64 = theta.astype(np.float64)
    new_state = type(state)(
        iteration=state.iteration + 1, theta=theta, opt=opt, obs_stats=stats,
        prev_lengths=lengths, timesteps=state.timesteps + int(lengths.sum()),
        episodes=state.episodes + 2 * n, wall_seconds=state.wall_seconds + iteration_seconds,
        extras=state.extras)
    row = dict(
        iteration=state.iteration, timesteps=new_state.timesteps, episodes=new_state.episodes,
        wall_seconds=new_state.wall_seconds, iteration_seconds=iteration_seconds,
        time_rollout=t1 - t0, time_comm=t2 - t1, time_update=t3 - t2,
        fitness_mean=returns.mean(), fitness_max=returns.max(), fitness_min=returns.min(),
        fitness_std=returns.std(),
        eval_return=evals[:, 1].mean() if len(evals) else np.nan,
        eval_length=evals[:, 2].mean() if len(evals) else np.nan,
        episode_length_mean=lengths.mean(), episode_cap=cap,
        grad_norm=float(np.linalg.norm(grad)),
        update_norm=float(np.linalg.norm(theta64 - state.theta)),
        theta_norm=float(np.linalg.norm(theta64)), obs_count=stats.count)
    return new_state, row


def format_row(row: dict) -> str:
    return (f"iter {row['iteration']:5d} | steps {row['timesteps']:>11,d} | "
            f"episodes {row['episodes']:>9,d} | fitness mean {row['fitness_mean']:9.2f} "
            f"max {row['fitness_max']:9.2f} | eval {row['eval_return']:9.2f} | "
            f"cap {row['episode_cap']:5d} | {row['iteration_seconds']:6.2f}s")


def start(cfg: JobConfig, comm, env, policy, force: bool = False) -> tuple:
    """Collective: (state, runtime, None) to train from, or (None, None, exit code) to stop."""
    is_root = comm.Get_rank() == 0
    try:
        state = resume_or_start(cfg, comm, force)
        if state is not None and state.iteration >= cfg.run.iterations:
            if is_root:
                report_complete(cfg, state)
            return None, None, EXIT_OK
        rt = build_runtime(cfg, comm, env, policy)
        state = initial_state(rt, cfg) if state is None else state
        check_compatible(state, rt.policy.num_params)
        prepare_vbn(cfg, comm, rt, state)
    except ResumeRefused as exc:
        if is_root:
            print(f"es_mpi: cannot resume: {exc}", file=sys.stderr, flush=True)
        return None, None, EXIT_CONFIG_ERROR
    return state, rt, None


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def report_complete(cfg: JobConfig, state) -> None:
    """Rank 0, run already complete: check results.h5 against the checkpoint's rows and
    rebuild it (with a warning) if it is missing, unreadable or different."""
    from .results import repair_results

    repair_results(Path(cfg.run.dir) / "results.h5", state.iteration, state.results,
                   cfg.to_yaml(), _warn)
    print(f"es_mpi: {cfg.run.dir} is already complete (iteration {state.iteration}, "
          f"run.iterations={cfg.run.iterations}); nothing to do", flush=True)


def open_results(cfg: JobConfig, state, comm, rt: Runtime):
    """Rank 0: write config.yaml, open results.h5 with the rows before `state.iteration`
    (taken from the resumed checkpoint; a damaged old results.h5 is set aside)."""
    from .determinism import cpu_kernels
    from .results import ResultsWriter

    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    writer = ResultsWriter(run_dir / "results.h5", keep_rows=state.iteration,
                           config_text=cfg.to_yaml(), warn=_warn, rows=state.results)
    print(f"es_mpi: {cfg.env.id}, policy {cfg.policy.kind} with {rt.policy.num_params:,} "
          f"parameters, {comm.Get_size()} ranks, population {cfg.es.population} pairs, "
          f"run dir {run_dir}, CPU kernels {cpu_kernels()}", flush=True)
    return writer


def train(cfg: JobConfig, comm, env, policy, flag: PreemptionFlag | None = None,
          force: bool = False) -> int:
    """The loop: start or resume, iterate, log, checkpoint; stop at a preemption boundary."""
    from . import comm as mpi

    flag = flag or PreemptionFlag()
    is_root = comm.Get_rank() == 0
    state, rt, code = start(cfg, comm, env, policy, force)
    if code is not None:
        return code
    mpi.check_identical(comm, state.theta, state.iteration - 1)
    writer = open_results(cfg, state, comm, rt) if is_root else None
    saved = True  # the state we start from is a checkpoint (or the initial state)
    try:
        while state.iteration < cfg.run.iterations:
            if flag.agreed(comm):  # the iteration boundary: every rank decides the same
                return checkpoint_on_preemption(cfg, comm, flag, state, saved,
                                                writer.rows() if is_root else None)
            state, row = run_iteration(cfg, comm, rt, state)
            saved = False
            if cfg.run.verify_every and state.iteration % cfg.run.verify_every == 0:
                mpi.check_identical(comm, state.theta, state.iteration - 1)
            if is_root:
                writer.append(row)
                print(format_row(row), flush=True)
            if (state.iteration % cfg.run.checkpoint_every == 0
                    or state.iteration == cfg.run.iterations):
                if is_root:
                    write_checkpoint(cfg, state, writer.rows())
                saved = True
    finally:
        if writer is not None:
            writer.close()
    mpi.check_identical(comm, state.theta, state.iteration - 1)
    comm.Barrier()
    return EXIT_OK


def launch(comm, args, flag: PreemptionFlag) -> int:
    """Check the launcher, load the job, check run.dir and build the env (cheap, before
    torch), build the policy (all ranks agree at each step), then train."""
    if not check_launcher(comm):
        return EXIT_LAUNCHER_ERROR
    cfg = agree(comm, load_job, args.job, args.overrides)
    env = None if cfg is None else agree(comm, preflight, cfg, comm.Get_rank() == 0)
    policy = None if env is None else agree(comm, build_policy, cfg, env)
    if policy is None:
        return EXIT_CONFIG_ERROR
    return train(cfg, comm, env, policy, flag, args.force)


def main(argv: list[str] | None = None) -> int:
    flag = PreemptionFlag().install()  # first: a signal during start-up must not kill us
    args = parse_args(argv)
    from . import comm as mpi

    comm = mpi.world()
    # Any exception on any rank, set-up included, ends the whole job (no rank left waiting).
    return mpi.abort_on_exception(comm, launch, comm, args, flag)


if __name__ == "__main__":
    sys.exit(main())
