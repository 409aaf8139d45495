"""The only place ranks meet: work split, gathers, the shared noise window, checks, abort.

Everything here takes an `MPI.Comm` argument, so the same code (and its tests) runs at any
world size, a singleton `python -m es_mpi.run` included.
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
import traceback
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from . import noise
from .schedule import split_range  # noqa: F401  (also part of this module's API)

ABORT_GRACE_SECONDS = 1.0  # between writing a failed rank's traceback and MPI_Abort


def world() -> MPI.Comm:
    return MPI.COMM_WORLD


def allgather_rows(comm: MPI.Comm, rows: np.ndarray) -> np.ndarray:
    """Concatenate every rank's float64 (k_r, c) rows, in rank order, on every rank."""
    rows = np.ascontiguousarray(rows, dtype=np.float64)
    ncol = rows.shape[1]
    counts = np.array(comm.allgather(rows.shape[0]), dtype=np.int64)
    out = np.empty((int(counts.sum()), ncol), dtype=np.float64)
    sizes = (counts * ncol).tolist()
    displs = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
    comm.Allgatherv(rows, [out, sizes, displs, MPI.DOUBLE])
    return out


def gather_by_key(comm: MPI.Comm, rows: np.ndarray, n_keys: int | None = None) -> np.ndarray:
    """Allgather rows whose column 0 is an integer key j; return them sorted by j.

    With `n_keys`, check that every key 0..n_keys-1 arrived exactly once: results are keyed
    by j, not by rank, so any assignment of work to ranks gives the same arrays.
    """
    allrows = allgather_rows(comm, rows)
    allrows = allrows[np.argsort(allrows[:, 0], kind="stable")]
    if n_keys is not None and not np.array_equal(allrows[:, 0], np.arange(n_keys)):
        raise RuntimeError(f"gather_by_key: expected keys 0..{n_keys - 1} once each")
    return allrows


def allgather_floats(comm: MPI.Comm, value: float) -> np.ndarray:
    """One float64 from every rank, in rank order, on every rank."""
    out = np.empty(comm.Get_size(), dtype=np.float64)
    comm.Allgather(np.array([value], dtype=np.float64), out)
    return out


def gather_objects(comm: MPI.Comm, obj, root: int = 0) -> list | None:
    """Every rank's picklable `obj` on `root`, in rank order (None elsewhere)."""
    return comm.gather(obj, root=root)


def allreduce_sum(comm: MPI.Comm, array: np.ndarray) -> np.ndarray:
    """Element-wise sum over ranks (use for integers only: those sum exactly in any order)."""
    out = np.empty_like(array)
    comm.Allreduce(np.ascontiguousarray(array), out, op=MPI.SUM)
    return out


def any_rank(comm: MPI.Comm, flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank."""
    return bool(comm.allreduce(bool(flag), op=MPI.LOR))


def any_rank_each(comm: MPI.Comm, *flags: bool) -> tuple[bool, ...]:
    """For each flag, True on every rank if it is true on any rank (one collective)."""
    out = np.empty(len(flags), dtype=np.int32)
    comm.Allreduce(np.array(flags, dtype=np.int32), out, op=MPI.MAX)
    return tuple(bool(v) for v in out)


def first_failing_rank(comm: MPI.Comm, failed: bool) -> int | None:
    """The lowest rank where `failed` is true, agreed on every rank; None if none failed."""
    first = comm.allreduce(comm.Get_rank() if failed else comm.Get_size(), op=MPI.MIN)
    return None if first == comm.Get_size() else first


def theta_digest(theta: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(theta).tobytes(), digest_size=8).hexdigest()


def check_identical(comm: MPI.Comm, theta: np.ndarray, iteration: int, what: str = "theta") -> str:
    """Raise on every rank if theta (or the array named `what`) differs anywhere; return the
    common digest."""
    digests = comm.allgather(theta_digest(theta))
    if len(set(digests)) != 1:
        raise RuntimeError(f"{what} diverged across ranks after iteration {iteration}: "
                           + ", ".join(f"rank {r}: {d}" for r, d in enumerate(digests)))
    return digests[0]


def broadcast_array(comm: MPI.Comm, array: np.ndarray | None, root: int = 0) -> np.ndarray:
    """`array` of rank `root` on every rank (the others pass None)."""
    meta = comm.bcast((array.shape, array.dtype.str) if comm.Get_rank() == root else None, root)
    buf = np.ascontiguousarray(array) if comm.Get_rank() == root else np.empty(meta[0], meta[1])
    comm.Bcast(buf, root=root)
    return buf


@dataclass
class SharedTable:
    """The noise table in one node-shared window; keep this object alive while it is used."""

    table: np.ndarray
    window: MPI.Win
    node_comm: MPI.Comm

    def free(self) -> None:
        self.window.Free()
        self.node_comm.Free()


NODE_SIZE_VAR = "ES_MPI_NODE_SIZE"  # test multi-node logic on one machine: pseudo-nodes of k ranks


def node_comm(comm: MPI.Comm) -> MPI.Comm:
    """The ranks that share memory with this one: its node (COMM_TYPE_SHARED), or, with
    ES_MPI_NODE_SIZE=k, the pseudo-node of ranks [k*i, k*i + k) (all on one machine)."""
    k = os.environ.get(NODE_SIZE_VAR, "")
    if k:
        return comm.Split(comm.Get_rank() // int(k), key=comm.Get_rank())
    return comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())


def _allocate_shared(node: MPI.Comm, size: int, dtype) -> tuple[MPI.Win, np.ndarray]:
    """One array of `size` values per node (node rank 0 owns it, the others map it)."""
    itemsize = np.dtype(dtype).itemsize
    win = MPI.Win.Allocate_shared(size * itemsize if node.Get_rank() == 0 else 0, itemsize,
                                  comm=node)
    buf, _ = win.Shared_query(0)
    return win, np.ndarray(buffer=buf, dtype=dtype, shape=(size,))


def shared_noise_table(comm: MPI.Comm, size: int, noise_seed: int) -> SharedTable:
    """Allocate the table once per node and fill its chunks in parallel across the node's ranks.

    Rank 0 of the node owns the memory (Win.Allocate_shared); the others map it. Chunk k is
    filled by node rank k % node_size, and its values depend on (noise_seed, k) only.
    """
    node = node_comm(comm)
    win, table = _allocate_shared(node, size, np.float32)
    win.Lock_all()
    for k in range(node.Get_rank(), noise.n_chunks(size), node.Get_size()):
        noise.fill_chunk(table, noise_seed, k)
    win.Sync()  # publish this rank's writes, wait for everyone's, then see theirs
    node.Barrier()
    win.Sync()
    win.Unlock_all()
    return SharedTable(table, win, node)


@dataclass
class NodeSum:
    """A float64 vector in a node-shared window that the ranks fill in ranges of coordinates,
    then every rank reads all of it.

    node_split: the node's ranks split [0, dim) among themselves; every node computes the
    whole vector. world_split: the nodes first split [0, dim) into one contiguous block each,
    the node's ranks split their block, and one rank per node (the leaders) exchange the blocks
    with an in-place Allgatherv into the window. Each coordinate is computed whole by one rank
    either way, so the vector's bits do not depend on the split.
    """

    array: np.ndarray
    window: MPI.Win
    node_comm: MPI.Comm
    leaders: MPI.Comm | None = None  # world_split: node rank 0 of every node (else None)
    block: tuple[int, int] = (0, 0)  # this node's coordinates [lo, hi)
    blocks: np.ndarray | None = None  # world_split: every node's (lo, hi), in leader order

    @classmethod
    def allocate(cls, comm: MPI.Comm, dim: int, across_nodes: bool = False) -> "NodeSum":
        node = node_comm(comm)
        win, array = _allocate_shared(node, dim, np.float64)
        if not across_nodes:
            return cls(array, win, node, None, (0, dim))
        leader = node.Get_rank() == 0
        leaders = comm.Split(0 if leader else MPI.UNDEFINED, key=comm.Get_rank())
        index, n_nodes = node.bcast((leaders.Get_rank(), leaders.Get_size()) if leader else None)
        blocks = np.array([split_range(dim, n_nodes, i) for i in range(n_nodes)], np.int64)
        return cls(array, win, node, leaders if leader else None, tuple(blocks[index]), blocks)

    def my_range(self) -> tuple[int, int]:
        lo, hi = self.block
        a, b = split_range(hi - lo, self.node_comm.Get_size(), self.node_comm.Get_rank())
        return lo + a, lo + b

    def combine(self, fill) -> np.ndarray:
        """fill(lo, hi) -> values of coordinates [lo, hi) on each rank; returns a private
        copy of the whole vector on every rank. The next write to the window comes after the
        caller's next world collective, which every rank reaches only after its copy."""
        lo, hi = self.my_range()
        self.window.Lock_all()
        self.array[lo:hi] = fill(lo, hi)
        self._node_sync()  # the node's block is complete and visible on the node
        if self.blocks is not None:
            if self.leaders is not None:
                counts = self.blocks[:, 1] - self.blocks[:, 0]
                self.leaders.Allgatherv(MPI.IN_PLACE,
                                        [self.array, counts, self.blocks[:, 0], MPI.DOUBLE])
            self._node_sync()  # the other nodes' blocks, written by the leader, are visible
        self.window.Unlock_all()
        return self.array.copy()

    def _node_sync(self) -> None:
        self.window.Sync()  # publish this rank's writes, wait for the node, see the others'
        self.node_comm.Barrier()
        self.window.Sync()

    def free(self) -> None:
        self.window.Free()
        self.node_comm.Free()
        if self.leaders is not None:
            self.leaders.Free()


class WorkCounter:
    """A counter on world rank 0 that any rank increments atomically (MPI_Fetch_and_op).

    Dynamic work assignment takes chunk numbers from it. Every rank holds a passive-target
    epoch (Lock_all) on the window for the counter's whole life, so a fetch completes with a
    Flush and never waits for rank 0 to enter MPI: a fetch needs no lock request answered by
    a busy target (measured with MPICH 5: the first Lock on a rank-0 window busy in Python
    waited until rank 0's next MPI call; Lock_all + Flush answered in a few microseconds).
    Across nodes that relies on the network's remote atomics (InfiniBand, Slingshot, EFA
    have them); README.md, "Dynamic work assignment across nodes", says what to do where not.

    The counter is never reset: it only grows, and the caller subtracts its own base.
    """

    def __init__(self, comm: MPI.Comm):
        self.window = MPI.Win.Allocate(8 if comm.Get_rank() == 0 else 0, 8, comm=comm)
        if comm.Get_rank() == 0:  # an RMA write, so the zero is visible in any memory model
            self.window.Lock(0, MPI.LOCK_EXCLUSIVE)
            self.window.Put(np.zeros(1, dtype=np.int64), 0)
            self.window.Unlock(0)
        comm.Barrier()  # the zero is in place before anyone fetches
        self.window.Lock_all()
        self._one = np.ones(1, dtype=np.int64)
        self._got = np.zeros(1, dtype=np.int64)
        self._seen = np.zeros(1, dtype=np.int64)

    def fetch_add(self, increment: int = 1) -> int:
        """Add `increment` to the counter and return the value it had before."""
        self._one[0] = increment
        self.window.Fetch_and_op(self._one, self._got, 0, 0, MPI.SUM)
        self.window.Flush(0)
        return int(self._got[0])

    def peek(self) -> int:
        """The counter's value now, unchanged (an atomic read: local on rank 0)."""
        self.window.Fetch_and_op(self._one, self._seen, 0, 0, MPI.NO_OP)
        self.window.Flush(0)
        return int(self._seen[0])

    def free(self) -> None:
        self.window.Unlock_all()
        self.window.Free()


def abort_on_exception(comm: MPI.Comm, fn, *args, **kwargs):
    """Run fn; if it raises on this rank, print the traceback (a configuration error or a
    full disk: one line) and end the whole job now, with exit code 1 (2, 6).

    Without this, a rank that dies leaves the others blocked in their next collective.
    """
    try:
        return fn(*args, **kwargs)
    except SystemExit:
        raise
    except BaseException as exc:
        if comm.Get_size() == 1:
            raise  # alone: Python prints the traceback and exits non-zero
        from .launch import known_error

        known = known_error(exc)  # a configuration error or a full disk: one line, its code
        sys.stdout.flush()
        if known is None:
            sys.stderr.write(f"[es_mpi] rank {comm.Get_rank()} of {comm.Get_size()} failed:\n")
            traceback.print_exc()
        else:
            sys.stderr.write(f"{known[0]} (rank {comm.Get_rank()})\n")
        sys.stderr.flush()
        # MPI_Abort makes the launcher kill every process at once; give it a moment to forward
        # what this rank just wrote, or the traceback can be lost with the job (seen with
        # MPICH's hydra when a rank fails right after start-up).
        time.sleep(ABORT_GRACE_SECONDS)
        comm.Abort(1 if known is None else known[1])
