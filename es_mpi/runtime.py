"""Set-up of a run: environment, policy, the node-shared noise table, VBN, the starting state.

Used by `es_mpi.run`, `es_mpi.evaluate`, the benchmarks and the tests. The rank-local pieces
(`preflight`, `build_policy`) raise ConfigError on bad input; the collective ones take a
`comm` and go through `es_mpi.comm` (this module does not import mpi4py).
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ConfigError, JobConfig


@dataclass
class Runtime:
    """What one rank builds once: environment, policy, shared noise table, work assignment."""

    env: object
    policy: object
    noise: object  # comm.SharedTable
    episode_limit: int  # the env's own step limit (evaluation episodes run up to it)
    obs_shape: tuple
    assignment: object  # iteration.ASSIGNMENTS[run.assignment]: which episodes this rank runs
    node_sum: object = None  # comm.NodeSum for run.update world_split/node_split, else None

    def free(self) -> None:
        """Collective: release the MPI windows (the counter, the node sum, the noise table)."""
        self.assignment.free()
        if self.node_sum is not None:
            self.node_sum.free()
        self.noise.free()


# Bytes every rank holds per mirrored pair in an iteration's arrays (draws, the gathered
# (item, return, length) rows and their sorted copy, fitness, weights), rounded up
BYTES_PER_PAIR = 256


def physical_memory() -> int | None:
    """Bytes of memory of this machine, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_population(population: int, memory: int | None) -> None:
    """ConfigError if one iteration's per-pair arrays alone would not fit in `memory`."""
    need = population * BYTES_PER_PAIR
    if memory is not None and need > memory:
        raise ConfigError(f"es.population={population:,}: every rank would hold about "
                          f"{need / 2**30:,.0f} GiB of per-iteration arrays ({BYTES_PER_PAIR} "
                          f"bytes per pair), more than this machine's {memory / 2**30:,.0f} GiB")


def quiet_ale() -> None:
    """No 'A.L.E: Arcade Learning Environment' banner from this process (the ranks but 0:
    one banner per rank is hundreds of lines at scale); ALE errors are still printed."""
    import ale_py

    ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)


def preflight(cfg: JobConfig, is_root: bool):
    """The cheap checks, before torch is imported: a population that fits in memory, run.dir
    (rank 0, which alone writes it) and the environment (every rank; an unknown env.id or a bad
    env.kwargs raises ConfigError). Returns the environment, which the run then uses."""
    from . import envs
    from .envs_atari import is_atari
    from .iteration import progress_seconds
    from .resume import check_run_dir

    check_population(cfg.es.population, physical_memory())
    progress_seconds()  # ES_MPI_PROGRESS readable, or ConfigError now rather than mid-run
    if is_root:
        check_run_dir(Path(cfg.run.dir))
    elif is_atari(cfg.env.id):
        quiet_ale()
    return envs.make_env(cfg.env)


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
    if distinct_offsets(cfg, policy.num_params) < cfg.es.population:
        raise ConfigError(few_offsets(cfg, policy.num_params, "every iteration would repeat "
                                                          "perturbations"))
    if cfg.policy.vbn:
        from .policies.vbn import uses_vbn
        if not uses_vbn(policy):
            raise ConfigError(f"policy.vbn: policy {cfg.policy.kind!r} has no VBN layers")
    return policy


def distinct_offsets(cfg: JobConfig, dim: int) -> int:
    """How many different perturbations eps_j the noise table holds for `dim` parameters."""
    return cfg.es.noise_table_size - dim + 1


def few_offsets(cfg: JobConfig, dim: int, consequence: str) -> str:
    return (f"es.noise_table_size={cfg.es.noise_table_size:,} holds "
            f"{distinct_offsets(cfg, dim):,} distinct perturbations of the policy's {dim:,} "
            f"parameters (table size - parameters + 1) for es.population={cfg.es.population:,}"
            f" pairs: {consequence}; use at least {dim + 100 * cfg.es.population:,} values")


def dubious_settings(cfg: JobConfig, env, policy) -> list[str]:
    """Legal settings that are probably a mistake, one line each (rank 0 prints them)."""
    out = []
    dim = policy.num_params
    n, m = cfg.es.population, distinct_offsets(cfg, dim)
    if m < 100 * n:  # a pair shares its offset with another with probability 1 - e^(-(n-1)/m)
        out.append(few_offsets(cfg, dim, f"about {100 * -math.expm1(-(n - 1) / m):.0f}% of the "
                                         "pairs of an iteration share their perturbation with "
                                         "another pair"))
    if cfg.policy.kind == "mlp" and len(env.observation_space.shape) > 1:
        out.append(f"policy.kind mlp on image observations of shape "
                   f"{tuple(env.observation_space.shape)}: {dim:,} parameters, most of them "
                   "weights of single pixels; policy.kind dt (the papers' Atari policy) or cnn "
                   "is what image observations need")
    return out


def build_training_policy(cfg: JobConfig, env):
    """build_policy, and run.init_from checked: it loads and fits (ConfigError otherwise).
    Only a training run reads run.init_from; evaluating or collecting from a checkpoint of
    such a run must not need the pretrained file."""
    from .init_from import check_init_from

    policy = build_policy(cfg, env)
    check_init_from(cfg, env, policy)
    return policy


def build_env_and_policy(cfg: JobConfig) -> tuple:
    """The rank-local part of set-up (no MPI): bad ids or sizes raise ConfigError."""
    from . import envs

    env = envs.make_env(cfg.env)
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
    """Environment, policy, the node-shared noise table and the work assignment (collective
    over `comm`)."""
    from . import comm as mpi
    from .envs import episode_limit
    from .iteration import ASSIGNMENTS

    if env is None:
        env, policy = build_env_and_policy(cfg)
    warn_if_mixed_kernels(comm)
    shared = mpi.shared_noise_table(comm, cfg.es.noise_table_size, cfg.es.noise_seed)
    node_sum = (None if cfg.run.update == "every_rank" else mpi.NodeSum.allocate(
        comm, policy.num_params, across_nodes=cfg.run.update == "world_split"))
    return Runtime(env, policy, shared, episode_limit(env), env.observation_space.shape,
                   ASSIGNMENTS[cfg.run.assignment](comm), node_sum)


def initial_state(rt: Runtime, cfg: JobConfig | None = None):
    """Iteration 0: the policy's initial theta (a function of run.seed) and empty observation
    statistics, or run.init_from's theta and statistics (a pretrained policy); zero optimiser
    state."""
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
    set_vbn_reference(rt.policy, ref)  # build_policy checked that it has VBN layers


def start(cfg: JobConfig, comm, env, policy, force: bool = False) -> tuple:
    """Collective: (state, runtime, None) to train from, or (None, None, exit code) to stop."""
    from .launch import EXIT_CONFIG_ERROR, EXIT_OK
    from .resume import ResumeRefused, check_compatible, resume_or_start

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


def warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def report_complete(cfg: JobConfig, state) -> None:
    """Rank 0, run already complete: check results.h5 against the checkpoint's rows and
    rebuild it (with a warning) if it is missing, unreadable or different."""
    from .results import Schema, repair_results

    repair_results(Path(cfg.run.dir) / "results.h5", state.iteration, state.results,
                   cfg.to_yaml(), warn, Schema.of_config(cfg))
    print(f"es_mpi: {cfg.run.dir} is already complete (iteration {state.iteration}, "
          f"run.iterations={cfg.run.iterations}); nothing to do", flush=True)


def theta_source(cfg: JobConfig, state) -> str:
    """', theta from run.init_from FILE' for a fresh start from a file; '' otherwise (a fresh
    policy from run.seed, or a resumed checkpoint, which 'resuming from' already names)."""
    if cfg.run.init_from is None or state.iteration > 0:
        return ""
    from .init_from import resolve
    return f", theta from run.init_from {resolve(cfg.run.init_from)}"


def open_results(cfg: JobConfig, state, comm, rt: Runtime):
    """Rank 0: write config.yaml, open results.h5 with the rows before `state.iteration`
    (taken from the resumed checkpoint; a damaged old results.h5 is set aside)."""
    from .determinism import cpu_kernels
    from .es import NOISE_SUM_KERNEL
    from .results import ResultsWriter, Schema

    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    writer = ResultsWriter(run_dir / "results.h5", keep_rows=state.iteration,
                           config_text=cfg.to_yaml(), warn=warn, rows=state.results,
                           schema=Schema.of_config(cfg))
    size = comm.Get_size()
    print(f"es_mpi: {cfg.env.id}, policy {cfg.policy.kind} with {rt.policy.num_params:,} "
          f"parameters{theta_source(cfg, state)}, {size} rank{'s' if size != 1 else ''}, "
          f"population {cfg.es.population} pairs, {cfg.run.assignment} work assignment, noise "
          f"sum {NOISE_SUM_KERNEL}, run dir {run_dir}, CPU kernels {cpu_kernels()}", flush=True)
    return writer
