"""A model of one iteration's seconds at P ranks, from measured costs (pure: no MPI, no torch).

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

import heapq
import math
from dataclasses import dataclass, fields
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
