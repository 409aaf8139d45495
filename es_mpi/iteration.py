"""One ES iteration on every rank, in three stages over typed records.

    plan      (IterationPlan)  what every rank derives from (config, state) alone: the draws of
                               (run seed, t, j), the episode cap, the observation transform
    rollouts  (LocalResults)   the episodes this rank runs, chosen by the work assignment
    exchange  (Gathered)       every rank's results, keyed by episode, on every rank
    update    (Step)           the same theta update on every rank, summed in order of j

Any stage can be replaced without touching the others, and `run_iteration` runs in-process on
a one-rank communicator (tests). Results are keyed by (j, sign) or evaluation episode, never
by rank, so theta is bitwise the same whoever evaluated what.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from . import es, rollout
from .checkpoint import TrainState
from .config import ConfigError, JobConfig
from .es import ObsStats
from .noise import EVAL_EPISODE, TRAIN_EPISODE, Draws, TargetSpec, episode_seed, iteration_draws
from .results import IterationRow
from .rollout import EpisodeResult, Normalizer
from .schedule import Item, chunk_bounds, decode, static_items


# ----------------------------------------------------------------------------- assignment
class StaticAssignment:
    """Rank r runs a fixed contiguous block of pairs and every P-th evaluation episode."""

    def __init__(self, comm):
        self.rank, self.size = comm.Get_rank(), comm.Get_size()

    def items(self, n_eval: int, n_pairs: int) -> Iterator[int]:
        return iter(static_items(n_eval, n_pairs, self.size, self.rank))

    def progress(self, n_eval: int, n_pairs: int, done: int) -> tuple[float, str]:
        """(fraction done, what it is) estimated from this rank's own share."""
        mine = len(static_items(n_eval, n_pairs, self.size, self.rank))
        return done / max(mine, 1), f"rank {self.rank} has run {done:,} of its {mine:,} episodes"

    def free(self) -> None:
        pass


class DynamicAssignment:
    """Ranks take chunks of items (schedule.chunk_bounds) from a counter on rank 0 until the
    pool is empty. Every rank's last fetch overshoots by one, so after an iteration the
    counter stands exactly at base + chunks + P on every rank: no reset is needed."""

    def __init__(self, comm):
        from . import comm as mpi

        self.size = comm.Get_size()
        self.counter = mpi.WorkCounter(comm)
        self.base = 0

    def items(self, n_eval: int, n_pairs: int) -> Iterator[int]:
        bounds = chunk_bounds(n_eval, n_pairs, self.size)
        n_chunks = len(bounds) - 1
        while (c := self.counter.fetch_add(1) - self.base) < n_chunks:
            yield from range(bounds[c], bounds[c + 1])
        self.base += n_chunks + self.size

    def progress(self, n_eval: int, n_pairs: int, done: int) -> tuple[float, str]:
        """(fraction handed out, what it is) from the counter (read on rank 0: local)."""
        bounds = chunk_bounds(n_eval, n_pairs, self.size)
        chunks = min(max(self.counter.peek() - self.base, 0), len(bounds) - 1)
        total = int(bounds[-1])
        return int(bounds[chunks]) / total, f"{bounds[chunks]:,} of {total:,} episodes handed out"

    def free(self) -> None:
        self.counter.free()


# run.assignment -> class(comm) with .items(n_eval, n_pairs) -> this rank's item numbers and
# .progress(n_eval, n_pairs, done) -> (fraction, words): rank 0's estimate for Progress
ASSIGNMENTS = {"static": StaticAssignment, "dynamic": DynamicAssignment}


# ----------------------------------------------------------------------------- plan
def eval_returns_to_go(cfg: JobConfig) -> tuple[float | None, ...]:
    """The initial returns-to-go of the evaluation slots: slot 0 the policy's own
    (policy.target_return; None for other policies), then each of es.eval_targets."""
    return (None, *(float(v) for v in cfg.es.eval_targets))


def n_eval_items(cfg: JobConfig) -> int:
    """Evaluation episodes per iteration: es.eval_episodes in each evaluation slot."""
    return cfg.es.eval_episodes * len(eval_returns_to_go(cfg))


@dataclass(frozen=True)
class IterationPlan:
    """What every rank knows about iteration t before any episode runs."""

    iteration: int
    draws: Draws  # with the pairs' target returns under es.fitness target_return
    cap: int  # step cap of the training episodes (adaptive)
    normalize: Normalizer  # observation transform with the current statistics
    shared_randomness: bool  # es.env_seeds per_iteration: the population shares its episode seed
    eval_rtgs: tuple[float | None, ...] = (None,)  # eval_returns_to_go: one per evaluation slot


def plan_iteration(cfg: JobConfig, rt, state: TrainState) -> IterationPlan:
    from .rollout import make_normalizer

    draws = iteration_draws(cfg.run.seed, state.iteration, cfg.es.population,
                            rt.noise.table.size, state.theta.size,
                            cfg.env.obs_stat_prob if cfg.env.normalize_obs else 0.0,
                            cfg.es.eval_episodes, cfg.es.env_seeds, TargetSpec.of(cfg.es))
    cap = es.adaptive_episode_cap(rt.episode_limit, state.prev_lengths, cfg.es.episode_cap_factor)
    return IterationPlan(state.iteration, draws, cap, make_normalizer(cfg.env, state.obs_stats),
                         cfg.es.env_seeds == "per_iteration", eval_returns_to_go(cfg))


# ----------------------------------------------------------------------------- progress
PROGRESS_VAR = "ES_MPI_PROGRESS"  # "AFTER,EVERY" seconds, e.g. "0,0" (tests); default below
PROGRESS_AFTER = 10.0  # an iteration gets progress lines once it has run this long
PROGRESS_EVERY = 30.0  # at most one line per this many seconds (10 on a terminal)


def progress_seconds() -> tuple[float, float]:
    """(after, every) of the progress lines: ES_MPI_PROGRESS, else the defaults;
    ConfigError if the variable is not one or two numbers of seconds."""
    text = os.environ.get(PROGRESS_VAR, "")
    if not text:
        return PROGRESS_AFTER, 10.0 if sys.stdout.isatty() else PROGRESS_EVERY
    after, _, every = text.partition(",")
    try:
        seconds = float(after), float(every or PROGRESS_EVERY)
    except ValueError:
        seconds = (-1.0, -1.0)
    if not all(0 <= x < float("inf") for x in seconds):
        raise ConfigError(f"{PROGRESS_VAR}={text!r}: expected AFTER[,EVERY] in seconds, e.g. "
                          "'10,30'")
    return seconds


class Progress:
    """Rank 0's progress lines inside a long iteration (iteration 0 of a large population
    can take minutes with nothing else printed). `tick` runs after every episode and costs
    one clock read unless a line is due."""

    def __init__(self, iteration: int, report, after: float, every: float):
        self.iteration, self.report, self.every = iteration, report, every
        self.start = time.monotonic()
        self.due = self.start + after

    def tick(self, done: int) -> None:
        if time.monotonic() >= self.due:
            self._line(done)

    def _line(self, done: int) -> None:
        now = time.monotonic()
        fraction, what = self.report(done)
        elapsed = now - self.start
        left = f"about {elapsed * (1 - fraction) / fraction:,.0f} s left" if fraction > 0 \
            else "time left unknown"
        # not "iter ...": log readers take those lines for finished iterations
        print(f"es_mpi: iteration {self.iteration} in progress: {what} "
              f"({100 * fraction:.0f}%), {elapsed:,.0f} s so far, {left}", flush=True)
        self.due = now + self.every


def progress_for(cfg: JobConfig, comm, rt, state: TrainState) -> Progress | None:
    """Rank 0's Progress for this iteration (None on the other ranks)."""
    if comm.Get_rank() != 0:
        return None
    n_eval, n_pairs = n_eval_items(cfg), cfg.es.population
    return Progress(state.iteration, lambda done: rt.assignment.progress(n_eval, n_pairs, done),
                    *progress_seconds())


# ----------------------------------------------------------------------------- rollouts
@dataclass
class LocalResults:
    """The rollout stage's output on one rank: its episodes, keyed by item number."""

    items: list[int] = field(default_factory=list)
    returns: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    recorded: list[tuple[int, EpisodeResult]] = field(default_factory=list)  # (2j + s, obs sums)
    busy_seconds: float = 0.0  # from the start of the iteration to the end of the last episode

    def rows(self) -> np.ndarray:
        """(k, 3) float64 rows (item, return, length) for the exchange."""
        return np.array([self.items, self.returns, self.lengths], dtype=np.float64).T.reshape(-1, 3)


def run_item(cfg: JobConfig, rt, state: TrainState, plan: IterationPlan,
             item: Item) -> EpisodeResult:
    """One episode: theta itself (evaluation, no action noise: OpenAI's evaluation), or
    theta +- sigma eps_j on the env seed of pair j, from return-to-go R*_j with targets."""
    seed, t, draws = cfg.run.seed, plan.iteration, plan.draws
    if item.is_eval:  # slot k, episode e: every slot runs the same seeds (only the RTG differs)
        k, e = divmod(item.index, cfg.es.eval_episodes)
        rt.policy.set_theta(state.theta)
        return rollout.run_episode(rt.env, rt.policy, draws.eval_seeds[e], rt.episode_limit,
                                   plan.normalize, target_return=plan.eval_rtgs[k],
                                   episode_seed=episode_seed(seed, t, EVAL_EPISODE, e, 0))
    j, s = item.index, item.sign
    eps = rt.noise.table[draws.offsets[j]: draws.offsets[j] + state.theta.size]
    rt.policy.set_perturbed(state.theta, eps, (1.0, -1.0)[s] * cfg.es.sigma)
    key = 0 if plan.shared_randomness else j
    target = None if draws.targets is None else float(draws.targets[j])
    return rollout.run_episode(rt.env, rt.policy, draws.env_seeds[j, s], plan.cap, plan.normalize,
                               bool(draws.record_obs[j, s]), target_return=target,
                               episode_seed=episode_seed(seed, t, TRAIN_EPISODE, key, s),
                               action_noise_std=cfg.policy.action_noise_std,
                               squares=cfg.env.obs_squares)


def rollouts(cfg: JobConfig, rt, state: TrainState, plan: IterationPlan,
             progress: Progress | None = None) -> LocalResults:
    """Run the episodes the work assignment gives this rank (`progress`: rank 0's lines)."""
    start, out = time.perf_counter(), LocalResults()
    n_eval = n_eval_items(cfg)
    for number in rt.assignment.items(n_eval, cfg.es.population):
        item = decode(number, n_eval)
        res = run_item(cfg, rt, state, plan, item)
        out.items.append(number)
        out.returns.append(res.ret)
        out.lengths.append(res.length)
        if res.obs_count:
            out.recorded.append((number - n_eval, res))
        if progress is not None:
            progress.tick(len(out.items))
    out.busy_seconds = time.perf_counter() - start
    return out


# ----------------------------------------------------------------------------- exchange
@dataclass(frozen=True)
class EpisodeResults:
    """Returns and lengths of a set of episodes, in a fixed order on every rank."""

    returns: np.ndarray  # float64; (N, 2) for pairs (column 0: +sigma, 1: -sigma), (E,) for evaluation
    lengths: np.ndarray  # int64, same shape


@dataclass(frozen=True)
class Gathered:
    """The exchange stage's output: identical on every rank."""

    pairs: EpisodeResults  # (N, 2), row j
    evals: EpisodeResults  # (S E,): evaluation slot k's E episodes at k E .. (k + 1) E - 1
    obs_stats: ObsStats  # the statistics with this iteration's recorded episodes added
    rollout_idle: float  # 1 - mean/max of the ranks' seconds in episodes


def _split_rows(rows: np.ndarray, n_eval: int, n_pairs: int) -> tuple[EpisodeResults, ...]:
    """Gathered (item, return, length) rows, sorted by item -> (pairs, evaluations)."""
    ret, length = rows[:, 1], rows[:, 2].astype(np.int64)
    return (EpisodeResults(ret[n_eval:].reshape(n_pairs, 2), length[n_eval:].reshape(n_pairs, 2)),
            EpisodeResults(ret[:n_eval], length[:n_eval]))


def gather_obs_stats(comm, recorded: list, obs_space, stats: ObsStats) -> ObsStats:
    """`stats` plus the recorded episodes' observation sums of every rank (a new object, the
    same on every rank). `recorded` holds (key, EpisodeResult) with key = 2j + sign.

    Integer frames (Atari) have integer sums, exact in int64 in any order: one Allreduce.
    Float observations are added one episode at a time in order of key (float64 addition is
    not associative), after an Allgatherv of the per-episode sums.
    """
    from . import comm as mpi

    out = ObsStats(stats.sum.copy(), stats.sumsq.copy(), stats.count)
    shape, width = obs_space.shape, int(np.prod(obs_space.shape))
    if np.issubdtype(obs_space.dtype, np.integer):
        total = np.zeros(2 * width + 1, dtype=np.int64)
        for _, res in recorded:
            total += np.concatenate([[res.obs_count], res.obs_sum.ravel(), res.obs_sumsq.ravel()])
        total = mpi.allreduce_sum(comm, total)
        if total[0]:
            out.add(total[1:1 + width].reshape(shape).astype(np.float64),
                    total[1 + width:].reshape(shape).astype(np.float64), float(total[0]))
        return out
    rows = [np.concatenate([[key, res.obs_count], res.obs_sum.ravel(), res.obs_sumsq.ravel()])
            for key, res in recorded]
    for row in mpi.gather_by_key(comm, np.array(rows).reshape(-1, 2 + 2 * width)):
        out.add(row[2:2 + width].reshape(shape), row[2 + width:].reshape(shape), row[1])
    return out


def exchange(cfg: JobConfig, comm, rt, state: TrainState, local: LocalResults) -> Gathered:
    """Every rank's episode results (keyed by item), observation sums and busy seconds."""
    from . import comm as mpi

    n_eval, n_pairs = n_eval_items(cfg), cfg.es.population
    rows = mpi.gather_by_key(comm, local.rows(), n_eval + 2 * n_pairs)
    pairs, evals = _split_rows(rows, n_eval, n_pairs)
    stats = gather_obs_stats(comm, local.recorded, rt.env.observation_space, state.obs_stats)
    busy = mpi.allgather_floats(comm, local.busy_seconds)
    idle = 1.0 - busy.mean() / busy.max() if busy.max() > 0 else 0.0
    return Gathered(pairs, evals, stats, float(idle))


# ----------------------------------------------------------------------------- update
@dataclass(frozen=True)
class Step:
    """The update stage's output: the new theta and optimiser state (same on every rank)."""

    theta: np.ndarray  # (dim,) float32
    opt: es.OptimizerState
    grad_norm: float


def noise_sum(cfg: JobConfig, rt, offsets: np.ndarray, weights: np.ndarray, dim: int) -> np.ndarray:
    """sum_j w_j eps_j in float64, in order of j: by this rank alone (run.update every_rank)
    or each rank a range of coordinates (node_split: of the node's vector; world_split: of
    the world's, the nodes then exchange their blocks): the same bits."""
    table = rt.noise.table
    if rt.node_sum is None:
        return es.weighted_noise_sum(table, offsets, weights, 0, dim)
    return rt.node_sum.combine(lambda lo, hi: es.weighted_noise_sum(table, offsets, weights, lo, hi))


def update(cfg: JobConfig, rt, state: TrainState, plan: IterationPlan,
           pairs: EpisodeResults) -> Step:
    """Fitness (the returns, or -|R - R*_j| + w R), its shaping, the gradient estimate and the
    optimiser step."""
    fitness = es.episode_fitness(pairs.returns, plan.draws.targets, cfg.es.fitness,
                                 cfg.es.target_return_weight)
    weights = es.fitness_weights(fitness[:, 0], fitness[:, 1], cfg.es.fitness_shaping,
                                 cfg.es.tie_break)
    total = noise_sum(cfg, rt, plan.draws.offsets, weights, state.theta.size)
    grad = es.gradient_estimate(total, cfg.es.population, cfg.es.sigma, cfg.es.divide_by_sigma,
                                cfg.es.grad_divisor)
    theta, opt = es.es_update(state.theta, grad, state.opt, cfg.es)
    return Step(theta, opt, float(np.linalg.norm(grad)))


# ----------------------------------------------------------------------------- the iteration
@dataclass(frozen=True)
class StageSeconds:
    rollout: float
    exchange: float
    update: float

    @property
    def total(self) -> float:
        return self.rollout + self.exchange + self.update


def advance(state: TrainState, got: Gathered, step: Step, seconds: StageSeconds) -> TrainState:
    """The state after the iteration (the same on every rank)."""
    lengths = got.pairs.lengths.ravel()
    return TrainState(
        iteration=state.iteration + 1, theta=step.theta, opt=step.opt, obs_stats=got.obs_stats,
        prev_lengths=lengths, timesteps=state.timesteps + int(lengths.sum()),
        episodes=state.episodes + lengths.size, wall_seconds=state.wall_seconds + seconds.total,
        extras=state.extras)


def _slot_means(values: np.ndarray, slots: int) -> np.ndarray:
    """(S E,) evaluation values -> (S,) mean per slot; NaN without evaluation episodes."""
    if values.size == 0:
        return np.full(slots, np.nan)
    return values.reshape(slots, -1).mean(axis=1)


def results_row(old: TrainState, new: TrainState, plan: IterationPlan, got: Gathered,
                step: Step, seconds: StageSeconds) -> IterationRow:
    returns, lengths = got.pairs.returns.ravel(), got.pairs.lengths.ravel()
    slots = len(plan.eval_rtgs)
    eval_returns = _slot_means(got.evals.returns, slots)
    targets = plan.draws.targets
    theta64 = new.theta.astype(np.float64)
    return IterationRow(
        iteration=old.iteration, timesteps=new.timesteps, episodes=new.episodes,
        wall_seconds=new.wall_seconds, iteration_seconds=seconds.total,
        time_rollout=seconds.rollout, time_comm=seconds.exchange, time_update=seconds.update,
        fitness_mean=returns.mean(), fitness_max=returns.max(), fitness_min=returns.min(),
        fitness_std=returns.std(),
        eval_return=eval_returns[0], eval_length=_slot_means(got.evals.lengths, slots)[0],
        episode_length_mean=lengths.mean(), episode_cap=plan.cap, grad_norm=step.grad_norm,
        update_norm=float(np.linalg.norm(theta64 - old.theta)),
        theta_norm=float(np.linalg.norm(theta64)), obs_count=got.obs_stats.count,
        rollout_idle=got.rollout_idle,
        eval_return_targets=tuple(float(v) for v in eval_returns[1:]),
        target_error_mean=None if targets is None else float(
            np.abs(got.pairs.returns - targets[:, None]).mean()))


class Diverged(RuntimeError):
    """A value of the run is inf or NaN. Every checked array is the same on every rank, so
    every rank raises it at the same point: no rank is left waiting in a collective."""


def check_finite(iteration: int, arrays: dict[str, np.ndarray]) -> None:
    """Raise Diverged naming the first of `arrays` (what -> values) that holds inf or NaN."""
    for what, values in arrays.items():
        bad = np.size(values) - int(np.count_nonzero(np.isfinite(values)))
        if bad:
            raise Diverged(f"{what}: {bad:,} of {np.size(values):,} values are not finite "
                           f"in iteration {iteration}")


def run_iteration(cfg: JobConfig, comm, rt, state: TrainState) -> tuple[TrainState, IterationRow]:
    """One ES iteration on this rank; returns the new state (same on all ranks) and its row.
    Raises Diverged (on every rank) if the returns or the new state are not finite."""
    t0 = time.perf_counter()
    plan = plan_iteration(cfg, rt, state)
    local = rollouts(cfg, rt, state, plan, progress_for(cfg, comm, rt, state))
    t1 = time.perf_counter()
    got = exchange(cfg, comm, rt, state, local)
    check_finite(state.iteration, {"returns of the perturbed episodes": got.pairs.returns,
                                   "evaluation returns": got.evals.returns})
    t2 = time.perf_counter()
    with np.errstate(over="ignore", invalid="ignore"):  # reported by check_finite instead
        step = update(cfg, rt, state, plan, got.pairs)
    check_finite(state.iteration, {"theta": step.theta, "optimiser state m": step.opt.m,
                                   "optimiser state v": step.opt.v,
                                   "observation statistics": got.obs_stats.sumsq})
    seconds = StageSeconds(t1 - t0, t2 - t1, time.perf_counter() - t2)
    new = advance(state, got, step, seconds)
    return new, results_row(state, new, plan, got, step, seconds)
