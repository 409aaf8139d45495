"""A model of one iteration's seconds at P ranks, from measured costs (pure: no MPI, no torch).

    python -m es_mpi.scale_model jobs/humanoid_dt.yaml --ntasks 30    # #SBATCH sizes for a seed

    iteration = plan + rollout + exchange + update      (results.h5's iteration_seconds)
    per loop  = iteration + the loop's checks + rank 0's writes

- rollout: each episode costs `EpisodeCost.seconds(length)` (per-episode and per-step seconds
  measured per job); the lengths come from a real run (a checkpoint's prev_lengths). Dynamic
  assignment is an event simulation of the real chunk schedule (schedule.chunk_bounds): a free
  rank fetches the next chunk number from the counter on rank 0, which serves one fetch at a
  time (`Fabric.atomic_service`), and runs that chunk's episodes; the stage lasts until the
  slowest rank's last (empty) fetch is answered. Static assignment sums each rank's items
  (schedule.static_items). rollout_idle = 1 - mean/max of the ranks' busy seconds, as the run
  records it.
- exchange: a latency/bandwidth (Hockney) model of the collectives (Allgatherv of the
  per-episode rows, the observation statistics, the ranks' busy seconds) plus the measured
  local work per episode (sorting and splitting the rows).
- update: the noise sum sum_j w_j eps_j, N x d multiply-adds at the measured seconds per
  coordinate per eps, divided among all ranks (world_split: each node a 1/nodes block of the
  coordinates, then an Allgatherv of d float64 between one rank per node), among the node's
  ranks (node_split) or done by each (every_rank), but never faster than the node's memory can
  deliver the bytes it reads (N x d x 4 / nodes, N x d x 4, and x ranks per node for
  every_rank); plus shaping (per pair) and the optimiser step (per coordinate).
"""
from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np

from .schedule import chunk_bounds, split_range

ROW_BYTES = 24  # one (item, return, length) float64 row per episode in the exchange
OBJECT_BYTES = 64  # a small pickled Python object (comm.allgather of a count, a digest, a flag)


# ----------------------------------------------------------------------------- measured inputs
@dataclass(frozen=True)
class EpisodeCost:
    """Seconds of one training-path episode as a function of its length (measured per job)."""

    fixed: float  # per episode: theta (+ sigma eps) into the policy, env.reset, policy.reset
    env_step: float  # per env.step
    policy_head: tuple  # policy.act + normalisation + observe at step t, for t < len(policy_head)
    policy_tail: float  # the same per step for t >= len(policy_head) (a DT's full window)

    def seconds(self, lengths: np.ndarray) -> np.ndarray:
        lengths = np.asarray(lengths, dtype=np.int64)
        n = len(self.policy_head)
        head = np.concatenate([[0.0], np.cumsum(self.policy_head)])
        policy = head[np.minimum(lengths, n)] + np.maximum(lengths - n, 0) * self.policy_tail
        return self.fixed + lengths * self.env_step + policy


@dataclass(frozen=True)
class UpdateCost:
    """The update stage's costs (measured per job's d)."""

    coord_eps: float  # noise sum: seconds per coordinate per eps on one rank, its node busy
    node_bandwidth: float  # bytes/s the node reads from memory with all its ranks streaming
    per_pair: float  # fitness shaping: seconds per pair
    per_coord: float  # gradient scaling + optimiser step: seconds per coordinate
    split_copy: float  # node_split: each rank copies the node's float64 sum, seconds per coordinate


@dataclass(frozen=True)
class JobCosts:
    """Everything measured for one job."""

    episode: EpisodeCost
    update: UpdateCost
    plan_per_pair: float  # plan stage: seconds per pair (offsets, seeds, obs-stat draws)
    exchange_per_item: float  # local exchange work per episode (sort, split, obs sums)
    write_row: float  # rank 0: one results.h5 row
    write_checkpoint: float  # rank 0: one checkpoint at the job's d


@dataclass(frozen=True)
class JobShape:
    """What the model needs of a job's configuration."""

    n_pairs: int  # es.population
    n_eval: int  # es.eval_episodes
    dim: int  # parameters
    obs_width: int  # numbers per observation
    int_obs: bool  # integer frames: the obs statistics go in one Allreduce
    obs_stat_prob: float  # share of training episodes that record observation sums
    checkpoint_every: int
    verify_every: int  # theta hash check every this many iterations (0: never)

    @property
    def n_items(self) -> int:
        return self.n_eval + 2 * self.n_pairs


@dataclass(frozen=True)
class Link:
    """Hockney model of one kind of connection."""

    latency: float  # seconds per message step (alpha)
    byte_time: float  # seconds per byte (beta)


@dataclass(frozen=True)
class Fabric:
    """The machine: nodes of `ranks_per_node` ranks, connected within and between nodes."""

    intra: Link  # ranks of one node (shared memory)
    inter: Link  # across nodes
    per_object: float  # seconds to pickle + unpickle one rank's small object in comm.allgather
    fetch_intra: float  # counter fetch round trip from rank 0's node
    fetch_inter: float  # ... from another node
    atomic_intra: float  # seconds rank 0's window is busy per fetch, all ranks on one node
    atomic_inter: float  # ... with remote ranks (the network's atomics; fetches queue)
    ranks_per_node: int

    def link(self, ranks: int) -> Link:
        return self.intra if ranks <= self.ranks_per_node else self.inter

    def atomic_service(self, ranks: int) -> float:
        return self.atomic_intra if ranks <= self.ranks_per_node else \
            max(self.atomic_intra, self.atomic_inter)

    def fetch_latencies(self, ranks: int) -> np.ndarray:
        """Round trip of each rank's fetch (ranks 0..ranks_per_node-1 share rank 0's node)."""
        out = np.full(ranks, self.fetch_inter)
        out[: self.ranks_per_node] = self.fetch_intra
        return out


# ----------------------------------------------------------------------------- collectives
def allgather_seconds(link: Link, ranks: int, total_bytes: float) -> float:
    """Allgather(v) of `total_bytes` in all: log2(P) steps, each rank receives (P-1)/P of it."""
    if ranks <= 1:
        return 0.0
    return math.ceil(math.log2(ranks)) * link.latency + (ranks - 1) / ranks * total_bytes \
        * link.byte_time


def allreduce_seconds(link: Link, ranks: int, nbytes: float) -> float:
    """Allreduce (reduce-scatter + allgather) of `nbytes` per rank."""
    if ranks <= 1:
        return 0.0
    return 2 * math.ceil(math.log2(ranks)) * link.latency + 2 * (ranks - 1) / ranks * nbytes \
        * link.byte_time


def object_allgather_seconds(fabric: Fabric, ranks: int) -> float:
    """comm.allgather of one small Python object per rank (counts, theta digests)."""
    if ranks <= 1:
        return 0.0
    return allgather_seconds(fabric.link(ranks), ranks, ranks * OBJECT_BYTES) \
        + ranks * fabric.per_object


def exchange_seconds(shape: JobShape, costs: JobCosts, fabric: Fabric, ranks: int) -> float:
    """The exchange stage once the slowest rank arrives: rows, obs statistics, busy seconds."""
    link = fabric.link(ranks)
    rows = object_allgather_seconds(fabric, ranks) + allgather_seconds(
        link, ranks, ROW_BYTES * shape.n_items)
    if shape.int_obs:
        obs = allreduce_seconds(link, ranks, 8 * (2 * shape.obs_width + 1))
    else:
        recorded = shape.obs_stat_prob * 2 * shape.n_pairs
        obs = object_allgather_seconds(fabric, ranks) + allgather_seconds(
            link, ranks, recorded * 8 * (2 + 2 * shape.obs_width))
    busy = allgather_seconds(link, ranks, 8 * ranks)
    return rows + obs + busy + costs.exchange_per_item * shape.n_items


def loop_seconds(shape: JobShape, costs: JobCosts, fabric: Fabric, ranks: int) -> float:
    """Per iteration outside iteration_seconds: the preemption flag (an object allreduce), the
    theta hash check, rank 0's results row and its share of a checkpoint."""
    flag = allreduce_seconds(fabric.link(ranks), ranks, OBJECT_BYTES) \
        + math.ceil(math.log2(max(ranks, 1))) * fabric.per_object
    check = object_allgather_seconds(fabric, ranks) / shape.verify_every if shape.verify_every \
        else 0.0
    return flag + check + costs.write_row + costs.write_checkpoint / shape.checkpoint_every


# ----------------------------------------------------------------------------- update
def _world_split_sum(cost: UpdateCost, work: float, per_node: int, nodes: int) -> float:
    return _node_split_sum(cost, work / nodes, per_node, 1)


def _node_split_sum(cost: UpdateCost, work: float, per_node: int, nodes: int) -> float:
    return work * max(cost.coord_eps / per_node, 4.0 / cost.node_bandwidth)


def _every_rank_sum(cost: UpdateCost, work: float, per_node: int, nodes: int) -> float:
    return work * max(cost.coord_eps, 4.0 * per_node / cost.node_bandwidth)


# run.update -> (cost, N x d, ranks on a node, nodes) -> seconds of the noise sum
NOISE_SUM = {"world_split": _world_split_sum, "node_split": _node_split_sum,
             "every_rank": _every_rank_sum}


def update_seconds(shape: JobShape, cost: UpdateCost, mode: str, per_node: int,
                   nodes: int = 1, link: Link | None = None) -> float:
    """The update stage: the noise sum, the node's vector copied out of the shared window
    (world_split: after one rank per node exchanged the blocks, an Allgatherv of d float64
    over `link`), shaping and the optimiser step."""
    total = NOISE_SUM[mode](cost, float(shape.n_pairs) * shape.dim, per_node, nodes)
    copy = cost.split_copy * shape.dim if mode != "every_rank" else 0.0
    if mode == "world_split" and nodes > 1:
        copy += allgather_seconds(link, nodes, 8.0 * shape.dim)
    return total + copy + cost.per_pair * shape.n_pairs + cost.per_coord * shape.dim


# ----------------------------------------------------------------------------- rollouts
def dynamic_busy(seconds: np.ndarray, bounds: np.ndarray, fetch: np.ndarray,
                 service: float) -> np.ndarray:
    """Event simulation of the dynamic assignment: each rank's busy seconds.

    `seconds[i]`: item i's episode; chunk c holds items bounds[c]..bounds[c+1]-1; `fetch[r]`:
    rank r's fetch round trip. All ranks start at 0; a free rank asks the counter, which
    serves requests in order of arrival, `service` seconds each; the rank runs the chunk it
    was given, or stops (busy until that answer) when the chunks are gone.
    """
    ends = np.concatenate([[0.0], np.cumsum(seconds)])
    chunk = ends[bounds[1:]] - ends[bounds[:-1]]
    busy = np.zeros(len(fetch))
    ready = [(0.0, r) for r in range(len(fetch))]
    counter_free, next_chunk = 0.0, 0
    while ready:
        t, r = heapq.heappop(ready)
        counter_free = max(t, counter_free) + service
        answer = counter_free + fetch[r]
        if next_chunk >= chunk.size:
            busy[r] = answer
            continue
        heapq.heappush(ready, (answer + chunk[next_chunk], r))
        next_chunk += 1
    return busy


def static_busy(seconds: np.ndarray, n_eval: int, n_pairs: int, ranks: int) -> np.ndarray:
    """Each rank's seconds under the static assignment: its block of pairs (both signs) and
    evaluation episodes r, r + P, ... (schedule.static_items)."""
    train = np.concatenate([[0.0], np.cumsum(seconds[n_eval:])])
    blocks = np.array([split_range(n_pairs, ranks, r) for r in range(ranks)])
    busy = train[2 * blocks[:, 1]] - train[2 * blocks[:, 0]]
    np.add.at(busy, np.arange(n_eval) % ranks, seconds[:n_eval])
    return busy


def _dynamic(seconds: np.ndarray, shape: JobShape, fabric: Fabric, ranks: int) -> np.ndarray:
    return dynamic_busy(seconds, chunk_bounds(shape.n_eval, shape.n_pairs, ranks),
                        fabric.fetch_latencies(ranks), fabric.atomic_service(ranks))


def _static(seconds: np.ndarray, shape: JobShape, fabric: Fabric, ranks: int) -> np.ndarray:
    return static_busy(seconds, shape.n_eval, shape.n_pairs, ranks)


# run.assignment -> (episode seconds in item order, shape, fabric, P) -> busy seconds per rank
ROLLOUT = {"dynamic": _dynamic, "static": _static}


def idle_share(busy: np.ndarray) -> float:
    """1 - mean/max of the ranks' busy seconds (results.h5's rollout_idle)."""
    return float(1.0 - busy.mean() / busy.max()) if busy.max() > 0 else 0.0


# ----------------------------------------------------------------------------- prediction
@dataclass(frozen=True)
class Prediction:
    """One iteration at `ranks` ranks (seconds)."""

    ranks: int
    plan: float
    rollout: float  # the slowest rank's busy seconds
    exchange: float
    update: float
    loop: float  # outside iteration_seconds: checks and rank 0's writes
    rollout_idle: float
    ideal_rollout: float  # all episode seconds / P + the longest episode (the "ideal")
    lower_bound: float  # max(all episode seconds / P, the longest episode): no schedule beats it

    @property
    def iteration(self) -> float:
        """What results.h5's iteration_seconds holds."""
        return self.plan + self.rollout + self.exchange + self.update

    @property
    def total(self) -> float:
        return self.iteration + self.loop


def predict(shape: JobShape, costs: JobCosts, fabric: Fabric, item_lengths: np.ndarray,
            ranks: int, assignment: str, update: str) -> Prediction:
    """One iteration with episode lengths `item_lengths` in item order (E evaluation episodes,
    then training episode (j, s) at E + 2j + s)."""
    seconds = costs.episode.seconds(item_lengths)
    busy = ROLLOUT[assignment](seconds, shape, fabric, ranks)
    per_node = min(ranks, fabric.ranks_per_node)
    nodes = -(-ranks // fabric.ranks_per_node)
    return Prediction(
        ranks=ranks, plan=costs.plan_per_pair * shape.n_pairs, rollout=float(busy.max()),
        exchange=exchange_seconds(shape, costs, fabric, ranks),
        update=update_seconds(shape, costs.update, update, per_node, nodes, fabric.inter),
        loop=loop_seconds(shape, costs, fabric, ranks), rollout_idle=idle_share(busy),
        ideal_rollout=float(seconds.sum() / ranks + seconds.max()),
        lower_bound=float(max(seconds.sum() / ranks, seconds.max())))


def mean_prediction(draw: Callable[[np.random.Generator], np.ndarray], samples: int, seed: int,
                    run: Callable[[np.ndarray], Prediction]) -> Prediction:
    """The field-wise mean of `run(lengths)` over `samples` length draws (a seeded generator)."""
    rng = np.random.default_rng(seed)
    preds = [run(draw(rng)) for _ in range(samples)]
    mean = {f.name: float(np.mean([getattr(p, f.name) for p in preds])) for f in fields(Prediction)}
    return Prediction(**(mean | {"ranks": preds[0].ranks}))


# ----------------------------------------------------------------------------- lengths
def resample(lengths: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n lengths drawn with replacement from a measured distribution."""
    return rng.choice(np.asarray(lengths, dtype=np.int64), size=n, replace=True)


def late_mix(falls: np.ndarray, n: int, limit: int, full_share: float,
             rng: np.random.Generator) -> np.ndarray:
    """A late-training-like distribution: each episode runs the full `limit` steps with
    probability `full_share`, else ends in a fall drawn from `falls` (measured early lengths)."""
    out = resample(falls, n, rng)
    out[rng.random(n) < full_share] = limit
    return out


def item_lengths(eval_lengths: np.ndarray, train_lengths: np.ndarray) -> np.ndarray:
    """Lengths in item order: the E evaluation episodes, then the 2N training episodes."""
    return np.concatenate([np.asarray(eval_lengths, np.int64), np.asarray(train_lengths, np.int64)])


# ----------------------------------------------------------------------------- measured inputs
def costs_from(d: dict) -> JobCosts:
    """A job's costs from its record in the inputs JSON (docs/scale_model_inputs.json)."""
    ep = EpisodeCost(**(d["episode"] | {"policy_head": tuple(d["episode"]["policy_head"])}))
    return JobCosts(**(d | {"episode": ep, "update": UpdateCost(**d["update"])}))


def fabric_from(measured: dict, inter: Link, inter_fetch: float, inter_atomic: float,
                ranks_per_node: int) -> Fabric:
    """The measured intra-node fabric plus an assumed inter-node one. The measured fetch round
    trip includes one service at the counter, which the model adds itself (dynamic_busy), so
    the transport part is the difference."""
    return Fabric(intra=Link(measured["intra_latency"], measured["intra_byte_time"]),
                  inter=inter, per_object=measured["per_object"],
                  fetch_intra=max(0.0, measured["fetch_intra"] - measured["atomic_service"]),
                  fetch_inter=inter_fetch, atomic_intra=measured["atomic_service"],
                  atomic_inter=inter_atomic, ranks_per_node=ranks_per_node)


# ----------------------------------------------------------------------------- SLURM sizing
REPO = Path(__file__).resolve().parents[1]
DEFAULT_INPUTS = REPO / "docs" / "scale_model_inputs.json"
# between nodes, what one machine cannot measure (bench/scale_model.py's --inter-* defaults)
ASSUMED_INTER = (Link(2e-6, 1 / 10e9), 3e-6, 5e-7)
RANKS_PER_NODE = 16
SAFETY = 1.5  # on every predicted second: the model ran up to 12 % low against real
# iterations, late-training lengths are assumptions, a site's cores may be slower
MARGIN_S = 120  # slurmctld acts on limits every ~30 s; the ranks exit after the checkpoint
START_S = 120  # per run of the job: imports, the 1 GB noise table, reading the checkpoint
LATE_SHARE = 0.7  # late training: this share of episodes runs LATE_STEPS, the rest fall early
LATE_STEPS = 2500  # cap on the late episode length: Humanoid's 1,000-step limit is reached;
# Atari's 27,000 steps are not (an assumption, not a measurement: 10,000 frames, ~2.8 minutes
# of play, 3x the longest early Hero episode measured)
MAX_TIME_S = 24 * 3600  # default cap on --time: longer runs checkpoint and requeue
# private memory of one rank (peak RSS less its share of the noise table), MiB, measured with
# /usr/bin/time -v at 2 ranks (docs/performance.md, "Sizing a SLURM job")
RANK_MIB = {"humanoid_mlp": 381, "humanoid_dt": 450, "humanoid_openai": 390, "atari_hero": 621}
MEM_SAFETY = 1.25


@dataclass(frozen=True)
class Sizing:
    """Suggested #SBATCH values for one seed of a job at `ntasks` ranks (seconds, MiB)."""

    job: str
    measured_as: str
    ntasks: int
    iterations: int
    early: float  # predicted seconds of an iteration (loop included), early lengths
    late: float  # ... late-training lengths: the longest iterations of a run
    run_seconds: float  # the whole run at late lengths, unpadded
    time_s: int
    signal_s: int
    mem_mib: int
    runs: int  # runs of the job (the first + requeues) at time_s each

    def directives(self) -> list[str]:
        return [f"--ntasks={self.ntasks}", f"--time={hms(self.time_s)}",
                f"--signal=B:USR1@{self.signal_s}", f"--mem-per-cpu={self.mem_mib}M"]


def hms(seconds: int) -> str:
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def round_up(seconds: float, step: int) -> int:
    return int(math.ceil(seconds / step) * step)


def signal_lead(late: float, checkpoint: float) -> int:
    """--signal lead: the longest iteration plus a checkpoint write, padded, plus the margin;
    whole minutes."""
    return round_up(SAFETY * (late + checkpoint) + MARGIN_S, 60)


def time_limit(run_seconds: float, lead: int, cap: int) -> tuple[int, int]:
    """(--time, runs): the padded run plus the lead, in quarter hours, at most `cap` (then the
    job checkpoints and requeues: runs > 1; each run loses its start and the margin)."""
    want = round_up(SAFETY * (START_S + run_seconds) + lead, 900)
    if want <= cap:
        return want, 1
    return cap, math.ceil(SAFETY * run_seconds / (cap - SAFETY * START_S - MARGIN_S))


def mem_per_cpu(rank_mib: float, table_values: int) -> int:
    """MiB per rank: its private memory, padded, plus the whole noise table (a node may hold
    a single rank of the job, and then the table's only copy is in that rank's share)."""
    return round_up(MEM_SAFETY * rank_mib + table_values * 4 / 2 ** 20, 256)


def same_policy(a, b) -> bool:
    """Two jobs whose episodes cost the same: one env.id, one policy section."""
    from dataclasses import asdict
    return a.env.id == b.env.id and asdict(a.policy) == asdict(b.policy)


def measured_job(cfg, path: Path, measured: dict) -> str:
    """The measured job whose costs apply: one with the job's env.id and policy section (the
    job itself, or a variant of it with other ES or run keys), by name first."""
    from .config import ConfigError, load_job

    same = [name for name in measured
            if same_policy(cfg, load_job(REPO / "jobs" / f"{name}.yaml"))]
    if not same:
        raise ConfigError(f"{path}: no measured costs for a policy like this job's (measured: "
                          f"{', '.join(measured)}); measure them with `python bench/scale_model.py "
                          "measure` and pass --inputs")
    return path.stem if path.stem in same else same[0]


def job_lengths(m: dict, shape: JobShape, late_steps: int) -> dict:
    """early/late -> draw(rng) of item lengths (bench/scale_model.py's distributions, with the
    late length capped at `late_steps`)."""
    train, n = np.asarray(m["lengths"]["train"]), 2 * shape.n_pairs
    early_eval = np.full(shape.n_eval, int(round(m["lengths"]["eval_mean"])))
    limit = min(m["episode_limit"], late_steps)
    return {"early": lambda rng: item_lengths(early_eval, resample(train, n, rng)),
            "late": lambda rng: item_lengths(np.full(shape.n_eval, limit),
                                             late_mix(train, n, limit, LATE_SHARE, rng))}


def suggest(job: str | Path, ntasks: int, inputs: dict, overrides: list[str] = (),
            max_time: int = MAX_TIME_S, late_steps: int = LATE_STEPS) -> Sizing:
    """Predicted iterations of `job` at `ntasks` ranks (dynamic + world_split, 16 ranks a node)
    and the #SBATCH values that follow from them."""
    from dataclasses import replace

    from .config import job_path, load_job
    from .iteration import n_eval_items

    path = job_path(job)
    cfg = load_job(path, list(overrides))
    name = measured_job(cfg, path, inputs["jobs"])
    m = inputs["jobs"][name]
    shape = replace(JobShape(**m["shape"]), n_pairs=cfg.es.population, n_eval=n_eval_items(cfg),
                    checkpoint_every=cfg.run.checkpoint_every, verify_every=cfg.run.verify_every)
    costs = costs_from(m["costs"])
    fabric = fabric_from(inputs["fabric"], *ASSUMED_INTER, RANKS_PER_NODE)
    per = {dist: mean_prediction(draw, 3, 0, lambda lens: predict(
        shape, costs, fabric, lens, ntasks, cfg.run.assignment, cfg.run.update)).total
        for dist, draw in job_lengths(m, shape, late_steps).items()}
    run_seconds = cfg.run.iterations * per["late"]
    lead = signal_lead(per["late"], costs.write_checkpoint)
    time_s, runs = time_limit(run_seconds, lead, max_time)
    return Sizing(str(job), name, ntasks, cfg.run.iterations, per["early"], per["late"],
                  run_seconds, time_s, lead, mem_per_cpu(RANK_MIB[name],
                                                         cfg.es.noise_table_size), runs)


def report(s: Sizing) -> str:
    """What `python -m es_mpi.scale_model JOB --ntasks N` prints: the numbers, then the
    #SBATCH lines (the slurm/ templates carry these, tests/test_slurm_sizing.py checks it)."""
    runs = "one run" if s.runs == 1 else f"{s.runs} runs of {hms(s.time_s)} (each checkpoints " \
        "and requeues itself)"
    lines = [f"{s.job} at {s.ntasks} tasks (costs measured for {s.measured_as}; "
             f"{RANKS_PER_NODE} ranks a node):",
             f"  predicted seconds per iteration: {s.early:.3g} early in training, {s.late:.3g} "
             f"late ({100 * LATE_SHARE:.0f} % of episodes at the length limit, <= {LATE_STEPS})",
             f"  whole run: {s.iterations} iterations at late lengths = "
             f"{s.run_seconds / 3600:.3g} h -> {runs}",
             f"#SBATCH {s.directives()[0]}",
             f"#SBATCH {s.directives()[1]}",
             f"#SBATCH {s.directives()[2]}",
             f"#SBATCH {s.directives()[3]}"]
    if s.signal_s * 2 > s.time_s:
        lines.append("  WARNING: the signal lead is over half of --time: an iteration at this "
                     "size is too long for the time limit; use more tasks")
    return "\n".join(lines)


def read_inputs(path: str) -> dict:
    from .config import ConfigError
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--inputs {path}: cannot read the measured inputs: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError

    p = argparse.ArgumentParser(
        prog="python -m es_mpi.scale_model",
        description="Suggest #SBATCH --ntasks/--time/--signal/--mem-per-cpu for one seed of a "
                    "job at N tasks, from the scale model and its measured inputs.")
    p.add_argument("job", help="job YAML (a path, or jobs/NAME.yaml of this repository)")
    p.add_argument("--ntasks", type=int, required=True, help="MPI ranks of one seed")
    p.add_argument("--max-time", type=float, default=MAX_TIME_S / 3600,
                   help="hours: the longest --time to suggest (your site's limit; default 24)")
    p.add_argument("--late-steps", type=int, default=LATE_STEPS,
                   help="late-training episode length (steps) assumed; default %(default)s")
    p.add_argument("--inputs", default=str(DEFAULT_INPUTS), help="measured inputs JSON")
    p.add_argument("overrides", nargs="*", help="section.key=value, as for es_mpi.run")
    args = p.parse_intermixed_args(argv)
    try:
        for name, value in (("--ntasks", args.ntasks), ("--max-time", args.max_time),
                            ("--late-steps", args.late_steps)):
            if value <= 0:
                raise ConfigError(f"{name}: must be positive, got {value}")
        sizing = suggest(args.job, args.ntasks, read_inputs(args.inputs), args.overrides,
                         int(args.max_time * 3600), args.late_steps)
    except ConfigError as exc:
        print(f"es_mpi: configuration error: {exc}", file=sys.stderr)
        return 2
    print(report(sizing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
