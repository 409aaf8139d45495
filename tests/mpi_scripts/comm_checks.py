"""Run under `mpiexec -n K`: checks of es_mpi.comm at any world size."""
import os
import time

import numpy as np

from es_mpi import comm as mpi
from es_mpi import noise


def check_split(comm):
    for n in (0, 1, 5, 17):
        blocks = [mpi.split_range(n, comm.size, r) for r in range(comm.size)]
        covered = [j for lo, hi in blocks for j in range(lo, hi)]
        assert covered == list(range(n)), blocks


def check_gather_by_key(comm):
    n = 11
    # give rank r the keys j with j % size == r, in reverse order: any assignment must work
    mine = [j for j in range(n) if j % comm.size == comm.rank][::-1]
    rows = np.array([[j, j * 10.0, -j] for j in mine]).reshape(-1, 3)
    out = mpi.gather_by_key(comm, rows, n)
    assert np.array_equal(out[:, 0], np.arange(n)) and np.array_equal(out[:, 1], np.arange(n) * 10.0)
    empty = mpi.gather_by_key(comm, np.zeros((0, 4)))
    assert empty.shape == (0, 4)


def check_shared_table(comm):
    size = noise.CHUNK * 2 + 777
    shared = mpi.shared_noise_table(comm, size, noise_seed=9)
    assert np.array_equal(shared.table, noise.make_table(size, 9))
    # one copy per node: every rank of the node maps the same physical memory
    node = shared.node_comm
    marker = shared.table[size - 1]
    node.Barrier()
    if node.rank == node.size - 1:
        shared.table[size - 1] = 12345.0
    shared.window.Lock_all(); shared.window.Sync(); node.Barrier(); shared.window.Sync()
    shared.window.Unlock_all()
    assert shared.table[size - 1] == 12345.0
    node.Barrier()
    shared.free()
    return marker


def check_node_sum(comm):
    """Each rank fills its range (of the node's vector, or with across_nodes of the world's,
    the nodes exchanging their blocks); every rank reads the whole vector, twice in a row; a
    vector shorter than the rank count leaves some ranges empty."""
    k = int(os.environ.get(mpi.NODE_SIZE_VAR) or comm.size)
    for across_nodes in (False, True):
        for dim in (1001, 2):
            node_sum = mpi.NodeSum.allocate(comm, dim, across_nodes)
            assert node_sum.node_comm.size == min(k, comm.size - (comm.rank // k) * k)
            filled = comm.allreduce(np.diff(node_sum.my_range())[0])
            n_nodes = -(-comm.size // k)
            assert filled == dim * (1 if across_nodes else n_nodes)
            for scale in (1.0, -2.0):
                out = node_sum.combine(lambda lo, hi: np.arange(lo, hi) * scale)
                assert np.array_equal(out, np.arange(dim) * scale)
                comm.Barrier()  # the iteration's world collective between two combines
            node_sum.free()


def check_work_counter(comm):
    """Every value of the shared counter is handed out exactly once, whatever the timing."""
    counter = mpi.WorkCounter(comm)
    got = []
    for i in range(20):
        if comm.rank == 1:
            time.sleep(0.001)  # a slower rank takes fewer values
        got.append(counter.fetch_add(1))
    everyone = sorted(sum(comm.allgather(got), []))
    assert everyone == list(range(20 * comm.size)), everyone
    assert counter.fetch_add(0) == 20 * comm.size
    comm.Barrier()
    counter.free()


def check_dynamic_assignment(comm):
    """Over several iterations of different sizes, every item goes to exactly one rank, and a
    rank that is slow per item takes fewer of them."""
    from es_mpi.iteration import DynamicAssignment

    work = DynamicAssignment(comm)
    for n_eval, n_pairs in ((1, 40), (0, 7), (3, 1), (2, 60)):
        mine = []
        for item in work.items(n_eval, n_pairs):
            mine.append(item)
            time.sleep(0.004 if comm.rank == 0 else 0.0005)
        per_rank = comm.allgather(mine)
        assert sorted(sum(per_rank, [])) == list(range(n_eval + 2 * n_pairs)), per_rank
        if comm.size > 1 and n_pairs >= 40:
            assert len(per_rank[0]) < len(per_rank[1]), [len(x) for x in per_rank]
    comm.Barrier()
    work.free()


def check_identical(comm):
    theta = np.arange(5, dtype=np.float32)
    digest = mpi.check_identical(comm, theta, 0)
    assert len(digest) == 16
    assert mpi.any_rank(comm, comm.rank == comm.size - 1)
    assert not mpi.any_rank(comm, False)


if __name__ == "__main__":
    world = mpi.world()
    check_split(world)
    check_gather_by_key(world)
    check_shared_table(world)
    check_node_sum(world)
    check_identical(world)
    check_work_counter(world)
    check_dynamic_assignment(world)
    print(f"comm checks passed on rank {world.rank} of {world.size}", flush=True)
