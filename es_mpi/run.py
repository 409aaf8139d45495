"""`python -m es_mpi.run JOB.yaml [section.key=value ...]`: the SPMD training loop.

Every rank runs this same loop (no master): evaluate its share of the mirrored pairs, gather
the scalars keyed by pair index j, rebuild every eps_j from the shared noise table and apply
the same update, so theta stays bitwise identical everywhere without being sent.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one thread per rank; must precede numpy/torch imports

import argparse  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from .config import ConfigError, JobConfig, load_job  # noqa: E402

EXIT_OK = 0  # finished: run.iterations done (also when it was already done at start)
EXIT_CONFIG_ERROR = 2  # bad job/overrides, or resume refused (config differs, no valid ckpt)
EXIT_PREEMPTED = 3  # SIGTERM/SIGUSR1: checkpoint written; run the same command to resume
EXIT_LAUNCHER_ERROR = 4  # SLURM started N>1 tasks but each got its own one-rank MPI world

# Keys that may differ between a checkpoint's config and the resuming command's: extending a
# run (run.iterations) and moving its directory (run.dir: the checkpoint was found there, so
# a relative vs absolute spelling or a copied run dir is the same run) change no number.
RESUME_IGNORED_KEYS = ("run.iterations", "run.dir")

EPILOG = f"""\
Run directory: run.dir/config.yaml, results.h5, checkpoints/ckpt_NNNNNN.h5.
Running the same command again resumes from the newest checkpoint that passes its checksum
(corrupt ones are reported and skipped) and recomputes, bitwise identically, the iterations
after it. A config that differs from the checkpoint's in anything but
{" and ".join(RESUME_IGNORED_KEYS)} is refused unless --force. A run that is already
complete exits 0 at once.

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


class PreemptionFlag:
    """SIGTERM / SIGUSR1 set a flag, nothing more; the loop acts on it at iteration boundaries.

    The handler runs no I/O and no MPI (a checkpoint inside a handler could interleave with
    whatever the rank was doing). A signal that lands while the rank is blocked inside an MPI
    call is recorded by Python's C-level handler and this method runs as soon as the call
    returns, so the flag is always set before the next boundary's agreement.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> "PreemptionFlag":
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        self.signum = signum

    def is_set(self) -> bool:
        return self.signum is not None

    def agreed(self, comm) -> bool:
        """Collective: True on every rank if any rank has been signalled."""
        from . import comm as mpi
        return mpi.any_rank(comm, self.is_set())


def agree(comm, step, *args):
    """Run `step(*args)` on every rank; if it raises ConfigError anywhere, all ranks return None.

    Bad input is reported once (by the lowest failing rank), with exit code 2 and no traceback,
    and no rank is left waiting in a collective for one that failed.
    """
    from mpi4py import MPI

    result, error = None, None
    try:
        result = step(*args)
    except ConfigError as exc:
        error = str(exc)
    first_failed = comm.allreduce(comm.Get_rank() if error else comm.Get_size(), op=MPI.MIN)
    if first_failed < comm.Get_size():
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


def build_env_and_policy(cfg: JobConfig) -> tuple:
    """The rank-local part of set-up (no MPI): bad ids or sizes raise ConfigError."""
    import torch

    from .envs import make_env
    from .policies import make_policy

    torch.set_num_threads(cfg.run.torch_threads)
    env = make_env(cfg.env)
    try:
        policy = make_policy(cfg.policy, env.observation_space, env.action_space, cfg.run.seed)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if policy.num_params > cfg.es.noise_table_size:
        raise ConfigError(f"es.noise_table_size={cfg.es.noise_table_size} is smaller than the "
                          f"policy's {policy.num_params:,} parameters")
    return env, policy


def build_runtime(cfg: JobConfig, comm, env=None, policy=None) -> Runtime:
    """Environment, policy and the node-shared noise table (collective over `comm`)."""
    from . import comm as mpi
    from .envs import episode_limit

    if env is None:
        env, policy = build_env_and_policy(cfg)
    shared = mpi.shared_noise_table(comm, cfg.es.noise_table_size, cfg.es.noise_seed)
    return Runtime(env, policy, shared, episode_limit(env), env.observation_space.shape)


def initial_state(rt: Runtime):
    from .checkpoint import TrainState
    from .es import ObsStats, OptimizerState

    theta = rt.policy.get_theta()
    return TrainState(0, theta, OptimizerState.zeros(theta.size), ObsStats.empty(rt.obs_shape),
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
    if set_vbn_reference(rt.policy, ref) == 0:
        raise ConfigError(f"policy.vbn: policy {cfg.policy.kind!r} has no VBN layers")


def run_iteration(cfg: JobConfig, comm, rt: Runtime, state) -> tuple[object, dict]:
    """One ES iteration on this rank; returns the new state (same on all ranks) and a row."""
    from . import comm as mpi
    from . import es
    from .noise import iteration_draws
    from .rollout import Normalizer, run_episode

    t0 = time.perf_counter()
    rank, size, dim, n = comm.Get_rank(), comm.Get_size(), state.theta.size, cfg.es.population
    table = rt.noise.table
    draws = iteration_draws(cfg.run.seed, state.iteration, n, table.size, dim,
                            cfg.env.obs_stat_prob if cfg.env.normalize_obs else 0.0,
                            cfg.es.eval_episodes)
    cap = es.adaptive_episode_cap(rt.episode_limit, state.prev_lengths, cfg.es.episode_cap_factor)
    norm = (Normalizer(state.obs_stats.mean, state.obs_stats.std) if cfg.env.normalize_obs
            else Normalizer())
    obs_width = int(np.prod(rt.obs_shape))

    # --- rollouts: this rank's pairs j in [lo, hi), both signs on the same env seed
    lo, hi = mpi.split_range(n, size, rank)
    pair_rows, obs_rows = [], []
    for j in range(lo, hi):
        eps = table[draws.offsets[j]: draws.offsets[j] + dim]
        out = []
        for sign in (1.0, -1.0):
            rt.policy.set_perturbed(state.theta, eps, sign * cfg.es.sigma)
            record = bool(draws.record_obs[j]) and sign > 0
            out.append(run_episode(rt.env, rt.policy, draws.env_seeds[j], cap, norm, record))
        pair_rows.append([j, out[0].ret, out[1].ret, out[0].length, out[1].length])
        if out[0].obs_count:
            obs_rows.append(np.concatenate([[j, out[0].obs_count], out[0].obs_sum.ravel(),
                                            out[0].obs_sumsq.ravel()]))
    eval_rows = []
    rt.policy.set_theta(state.theta)
    for e in range(rank, cfg.es.eval_episodes, size):
        res = run_episode(rt.env, rt.policy, draws.eval_seeds[e], rt.episode_limit, norm)
        eval_rows.append([e, res.ret, res.length])
    t1 = time.perf_counter()

    # --- exchange scalars (and the few recorded obs sums), keyed by j
    pairs = mpi.gather_by_key(comm, np.array(pair_rows).reshape(-1, 5), n)
    evals = mpi.gather_by_key(comm, np.array(eval_rows).reshape(-1, 3), cfg.es.eval_episodes)
    obs = mpi.gather_by_key(comm, np.array(obs_rows).reshape(-1, 2 + 2 * obs_width))
    t2 = time.perf_counter()

    # --- the same update on every rank, summed in order of j
    ret_pos, ret_neg = pairs[:, 1], pairs[:, 2]
    weights = es.fitness_weights(ret_pos, ret_neg, cfg.es.fitness_shaping)
    noise_sum = es.weighted_noise_sum(table, draws.offsets, weights, 0, dim)
    grad = es.gradient_estimate(noise_sum, n, cfg.es.sigma, cfg.es.divide_by_sigma)
    theta, opt = es.es_update(state.theta, grad, state.opt, cfg.es)
    stats = state.obs_stats
    for row in obs:  # fixed order (by j), so the float64 sums are the same everywhere
        stats.add(row[2:2 + obs_width].reshape(rt.obs_shape),
                  row[2 + obs_width:].reshape(rt.obs_shape), row[1])
    t3 = time.perf_counter()

    lengths = pairs[:, 3:5].astype(np.int64).ravel()
    returns = pairs[:, 1:3].ravel()
    iteration_seconds = t3 - t0
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
        update_norm=float(np.linalg.norm(theta.astype(np.float64) - state.theta)),
        theta_norm=float(np.linalg.norm(theta.astype(np.float64))), obs_count=stats.count)
    return new_state, row


def format_row(row: dict) -> str:
    return (f"iter {row['iteration']:5d} | steps {row['timesteps']:>11,d} | "
            f"episodes {row['episodes']:>9,d} | fitness mean {row['fitness_mean']:9.2f} "
            f"max {row['fitness_max']:9.2f} | eval {row['eval_return']:9.2f} | "
            f"cap {row['episode_cap']:5d} | {row['iteration_seconds']:6.2f}s")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(saved_text: str, cfg: JobConfig,
                       ignore: tuple[str, ...] = RESUME_IGNORED_KEYS) -> list[str]:
    """'key: saved -> now' for every resolved key that differs, except the ignored ones.

    The saved text is re-read through the current loader when possible, so keys added to
    es_mpi since the checkpoint (with their defaults) do not count as differences.
    """
    import yaml

    from .config import loads
    try:
        saved = loads(saved_text).to_dict()
    except ConfigError:
        saved = yaml.safe_load(saved_text) or {}
    old, new = _flat(saved), _flat(cfg.to_dict())
    missing = "<absent>"
    return [f"{k}: {old.get(k, missing)!r} -> {new.get(k, missing)!r}"
            for k in sorted(set(old) | set(new))
            if k not in ignore and old.get(k, missing) != new.get(k, missing)]


class ResumeRefused(Exception):
    """run.dir holds a checkpoint this command must not continue (message says why)."""


def _resume_decision(cfg: JobConfig, force: bool) -> tuple:
    """Rank 0: ('fresh',) or ('resume', state, path) or ('refuse', message)."""
    from .checkpoint import latest_valid_checkpoint, list_checkpoints

    run_dir = Path(cfg.run.dir)
    warn = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    found = latest_valid_checkpoint(run_dir, warn)
    if found is None:
        if list_checkpoints(run_dir) and not force:
            return ("refuse", f"{run_dir}/checkpoints holds checkpoints but none passes its "
                              "checksum; inspect them, or pass --force to start over")
        return ("fresh",)
    state, saved_text, path = found
    diffs = config_differences(saved_text, cfg)
    if diffs and not force:
        return ("refuse", f"{path} was made with a different configuration:\n  "
                + "\n  ".join(diffs) + f"\nOnly {' and '.join(RESUME_IGNORED_KEYS)} may change on "
                "resume. Repeat the original job and overrides, choose a new run.dir, or pass "
                "--force to resume with the new settings.")
    if diffs:
        warn("es_mpi: WARNING: --force: resuming with a changed configuration:\n  "
             + "\n  ".join(diffs))
    return ("resume", state, path)


def resume_or_start(cfg: JobConfig, comm, force: bool = False):
    """Collective: the checkpointed state to continue from (same on every rank), or None.

    Rank 0 picks the newest checkpoint in run.dir that passes its checksum (skipping corrupt
    ones with a warning) and checks its config; the state is broadcast, so only rank 0 needs
    to see run.dir. None means start afresh (every rank builds the same initial state from
    run.seed). Raises ResumeRefused on every rank when resuming is refused. Runs before the
    runtime (envs, noise table) is built, so a refused or already complete run exits at once.
    """
    decision = _resume_decision(cfg, force) if comm.Get_rank() == 0 else None
    decision = comm.bcast(decision, root=0)
    if decision[0] == "refuse":
        raise ResumeRefused(decision[1])
    if decision[0] == "fresh":
        return None
    if comm.Get_rank() == 0:
        print(f"es_mpi: resuming from {decision[2]} (iteration {decision[1].iteration})",
              flush=True)
    return decision[1]


def check_compatible(state, rt: Runtime) -> None:
    """A resumed theta must fit the policy (it may not after --force with another policy)."""
    if state.theta.size != rt.policy.num_params:
        raise ResumeRefused(f"the checkpoint's theta has {state.theta.size} parameters but "
                            f"the policy has {rt.policy.num_params}")


def rng_info(cfg: JobConfig) -> dict:
    """How randomness is derived (recorded in checkpoints; no generator state is carried)."""
    return dict(scheme="draws of iteration t: SeedSequence([run.seed, t, 0x5EED]); noise "
                       "table chunk k: SeedSequence([noise_seed, k]); initial theta: "
                       "torch.manual_seed(run.seed)",
                run_seed=cfg.run.seed, noise_seed=cfg.es.noise_seed,
                noise_table_size=cfg.es.noise_table_size)


def write_checkpoint(cfg: JobConfig, state) -> Path:
    """Rank 0: checkpoint `state`, then keep only the newest run.keep_checkpoints."""
    from .checkpoint import checkpoint_path, prune_checkpoints, save_checkpoint

    path = save_checkpoint(checkpoint_path(cfg.run.dir, state.iteration), state, cfg.to_yaml(),
                           rng_info(cfg))
    prune_checkpoints(cfg.run.dir, cfg.run.keep_checkpoints)
    return path


def _preempted(cfg: JobConfig, comm, flag: PreemptionFlag, state, saved: bool) -> int:
    """All ranks: rank 0 checkpoints (unless this iteration is saved already); exit code 3."""
    from .checkpoint import checkpoint_path

    signalled = comm.gather(flag.signum, root=0)
    if comm.Get_rank() == 0:
        path = checkpoint_path(cfg.run.dir, state.iteration)
        if not saved and state.iteration > 0:
            write_checkpoint(cfg, state)
        who = ", ".join(f"rank {r}: {signal.Signals(s).name}"
                        for r, s in enumerate(signalled) if s is not None)
        print(f"es_mpi: preempted ({who}) after iteration {state.iteration}; checkpoint "
              f"{path if state.iteration > 0 else '(none needed)'}; run the same command to "
              f"resume. Exit code {EXIT_PREEMPTED}.", flush=True)
    comm.Barrier()  # no rank exits (and lets the launcher tear down) before the checkpoint
    return EXIT_PREEMPTED


def start(cfg: JobConfig, comm, env, policy, force: bool = False) -> tuple:
    """Collective: (state, runtime, None) to train from, or (None, None, exit code) to stop."""
    is_root = comm.Get_rank() == 0
    try:
        state = resume_or_start(cfg, comm, force)
        if state is not None and state.iteration >= cfg.run.iterations:
            if is_root:
                print(f"es_mpi: {cfg.run.dir} is already complete (iteration {state.iteration}, "
                      f"run.iterations={cfg.run.iterations}); nothing to do", flush=True)
            return None, None, EXIT_OK
        rt = build_runtime(cfg, comm, env, policy)
        state = initial_state(rt) if state is None else state
        check_compatible(state, rt)
        prepare_vbn(cfg, comm, rt, state)
    except ResumeRefused as exc:
        if is_root:
            print(f"es_mpi: cannot resume: {exc}", file=sys.stderr, flush=True)
        return None, None, EXIT_CONFIG_ERROR
    return state, rt, None


def open_results(cfg: JobConfig, state, comm, rt: Runtime):
    """Rank 0: write config.yaml, open results.h5 keeping the rows before `state.iteration`."""
    from .results import ResultsWriter

    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    writer = ResultsWriter(run_dir / "results.h5", keep_rows=state.iteration,
                           config_text=cfg.to_yaml(),
                           warn=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"es_mpi: {cfg.env.id}, policy {cfg.policy.kind} with {rt.policy.num_params:,} "
          f"parameters, {comm.Get_size()} ranks, population {cfg.es.population} pairs, "
          f"run dir {run_dir}", flush=True)
    return writer


def train(cfg: JobConfig, comm, env, policy, flag: PreemptionFlag | None = None,
          force: bool = False) -> int:
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
                return _preempted(cfg, comm, flag, state, saved)
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
                    write_checkpoint(cfg, state)
                saved = True
    finally:
        if writer is not None:
            writer.close()
    mpi.check_identical(comm, state.theta, state.iteration - 1)
    comm.Barrier()
    return EXIT_OK


def launcher_mismatch(env: dict, world_size: int) -> str | None:
    """Why this launch is wrong, or None: SLURM says N>1 tasks but our MPI world has one rank.

    That is what plain `srun` without a PMI plugin does: N independent singletons that would
    each train the same run and write the same files.
    """
    var = next((v for v in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") if env.get(v)), None)
    if var is None or world_size != 1 or env.get("ES_ALLOW_SINGLETON") == "1":
        return None
    try:
        tasks = int(env[var])
    except ValueError:
        return None
    if tasks <= 1:
        return None
    return (f"SLURM started {tasks} tasks ({var}={tasks}) but this MPI world has 1 rank, so "
            f"each task would train the same run alone. Launch one MPI world: "
            f"`srun --mpi=pmi2` (or --mpi=pmix, whichever your MPI supports) or "
            f"`mpiexec -n $SLURM_NTASKS` inside the allocation; in slurm/*.sh set ES_LAUNCHER. "
            f"Set ES_ALLOW_SINGLETON=1 to run one rank on purpose.")


def check_launcher(comm) -> bool:
    """False (after printing why, once) if the launch gave us a one-rank world by mistake."""
    problem = launcher_mismatch(os.environ, comm.Get_size())
    if problem and os.environ.get("SLURM_PROCID", "0") == "0":
        print(f"es_mpi: launcher error: {problem}", file=sys.stderr, flush=True)
    return problem is None


def main(argv: list[str] | None = None) -> int:
    flag = PreemptionFlag().install()  # first: a signal during start-up must not kill us
    args = parse_args(argv)
    from . import comm as mpi

    comm = mpi.world()
    if not check_launcher(comm):
        return EXIT_LAUNCHER_ERROR
    cfg = agree(comm, load_job, args.job, args.overrides)
    built = cfg and agree(comm, build_env_and_policy, cfg)
    if not built:
        return EXIT_CONFIG_ERROR
    return mpi.abort_on_exception(comm, train, cfg, comm, *built, flag, args.force)


if __name__ == "__main__":
    sys.exit(main())
