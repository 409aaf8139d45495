"""The scaling model's pure pieces (es_mpi/scale_model.py): the event simulation of the dynamic
assignment, the static sums, the cost functions."""
import numpy as np
import pytest

from es_mpi import scale_model as sm
from es_mpi.schedule import chunk_bounds, static_items

FREE = sm.Fabric(intra=sm.Link(0.0, 0.0), inter=sm.Link(0.0, 0.0), per_object=0.0,
                 fetch_intra=0.0, fetch_inter=0.0, atomic_intra=0.0, atomic_inter=0.0,
                 ranks_per_node=16)


def test_event_simulation_by_hand():
    """Items of 3, 1, 1, 1 s in single-item chunks on 2 ranks: rank 0 runs item 0, rank 1
    items 1, 2, 3. Then with a 0.5 s fetch round trip and 0.1 s per fetch at the counter,
    where rank 1's first fetch waits for rank 0's."""
    bounds = np.arange(5)
    np.testing.assert_allclose(sm.dynamic_busy(np.array([3.0, 1, 1, 1]), bounds, np.zeros(2), 0.0),
                               [3.0, 3.0])
    busy = sm.dynamic_busy(np.array([3.0, 1, 1, 1]), bounds, np.full(2, 0.5), 0.1)
    # rank 0: item 0 answered 0.6, done 3.6, empty fetch answered 3.6 + 0.1 + 0.5
    # rank 1: item 1 answered 0.7 -> 1.7; item 2 answered 2.3 -> 3.3; item 3 answered 3.9 -> 4.9;
    #         empty fetch answered 4.9 + 0.1 + 0.5
    np.testing.assert_allclose(busy, [4.2, 5.5])


def test_static_sums_are_the_static_items():
    rng = np.random.default_rng(1)
    n_eval, n_pairs, ranks = 3, 17, 5
    secs = rng.random(n_eval + 2 * n_pairs)
    want = [secs[static_items(n_eval, n_pairs, ranks, r)].sum() for r in range(ranks)]
    np.testing.assert_allclose(sm.static_busy(secs, n_eval, n_pairs, ranks), want)


@pytest.mark.parametrize("seed", range(20))
def test_dynamic_never_worse_than_static_by_more_than_a_chunk(seed):
    """With a free counter, the rank that ends last started its last chunk when no work had
    gone unclaimed, so dynamic <= total / P + the longest chunk <= static + the longest chunk."""
    rng = np.random.default_rng(seed)
    n_eval, n_pairs, ranks = int(rng.integers(0, 11)), int(rng.integers(1, 2000)), \
        int(rng.integers(1, 300))
    secs = rng.integers(20, 1001, n_eval + 2 * n_pairs).astype(float)
    bounds = chunk_bounds(n_eval, n_pairs, ranks)
    ends = np.concatenate([[0.0], np.cumsum(secs)])
    longest_chunk = (ends[bounds[1:]] - ends[bounds[:-1]]).max()
    dynamic = sm.dynamic_busy(secs, bounds, np.zeros(ranks), 0.0).max()
    assert dynamic <= secs.sum() / ranks + longest_chunk + 1e-6
    assert dynamic >= max(secs.sum() / ranks, secs.max()) - 1e-6  # no schedule beats this


@pytest.mark.parametrize("n_eval, n_pairs, ranks", [(0, 8, 2), (2, 7, 4), (4, 6, 4),
                                                    (0, 20_100, 300), (0, 5_040, 1440)])
def test_equal_episodes_leave_no_rank_idle(n_eval, n_pairs, ranks):
    """Equal episodes, an item count divisible by P: the dynamic assignment leaves no rank
    idle; the static one neither when pairs and evaluation episodes both divide evenly."""
    secs = np.ones(n_eval + 2 * n_pairs)
    dyn = sm.dynamic_busy(secs, chunk_bounds(n_eval, n_pairs, ranks), np.zeros(ranks), 0.0)
    assert sm.idle_share(dyn) == pytest.approx(0.0, abs=1e-12)
    static = sm.idle_share(sm.static_busy(secs, n_eval, n_pairs, ranks))
    if n_pairs % ranks == 0 and n_eval % ranks == 0:
        assert static == pytest.approx(0.0, abs=1e-12)
    else:
        assert static > 0


def test_counter_serialises_fetches():
    """P ranks asking at once wait in line at rank 0: the last answer comes P services later."""
    ranks, service = 100, 1e-3
    busy = sm.dynamic_busy(np.zeros(0), np.zeros(1, np.int64), np.zeros(ranks), service)
    np.testing.assert_allclose(np.sort(busy), service * np.arange(1, ranks + 1))


def test_episode_seconds_use_the_step_profile():
    cost = sm.EpisodeCost(fixed=1.0, env_step=0.5, policy_head=(0.1, 0.2), policy_tail=0.3)
    np.testing.assert_allclose(cost.seconds(np.array([0, 1, 2, 5])),
                               [1.0, 1.6, 2.3, 1.0 + 2.5 + 0.3 + 0.9])


def test_update_node_split_divides_until_the_memory_bound():
    cost = sm.UpdateCost(coord_eps=1e-9, node_bandwidth=8e9, per_pair=0.0, per_coord=0.0,
                         split_copy=0.0)
    shape = sm.JobShape(n_pairs=1000, n_eval=0, dim=1_000_000, obs_width=1, int_obs=False,
                        obs_stat_prob=0.0, checkpoint_every=1, verify_every=1)
    assert sm.update_seconds(shape, cost, "every_rank", 1) == pytest.approx(1.0)
    assert sm.update_seconds(shape, cost, "node_split", 2) == pytest.approx(0.5)
    # 16 ranks: 1/16 s of arithmetic each, but the node reads 4 GB at 8 GB/s
    assert sm.update_seconds(shape, cost, "node_split", 16) == pytest.approx(0.5)
    assert sm.update_seconds(shape, cost, "every_rank", 16) == pytest.approx(8.0)
    # world_split on one node is node_split; on 4 nodes each reads a quarter, then the
    # leaders' Allgatherv of d float64
    assert sm.update_seconds(shape, cost, "world_split", 16) == pytest.approx(0.5)
    link = sm.Link(latency=1e-5, byte_time=1e-10)
    assert sm.update_seconds(shape, cost, "world_split", 16, 4, link) == pytest.approx(
        0.125 + 2e-5 + 0.75 * 8e6 * 1e-10)

def test_the_model_knows_every_configurable_update_and_assignment():
    from typing import get_args, get_type_hints

    from es_mpi.config import RunConfig

    hints = get_type_hints(RunConfig)
    assert set(get_args(hints["update"])) == set(sm.NOISE_SUM)
    assert set(get_args(hints["assignment"])) == set(sm.ROLLOUT)


def test_one_rank_prediction_is_the_sum_of_its_parts():
    shape = sm.JobShape(n_pairs=3, n_eval=1, dim=10, obs_width=4, int_obs=False,
                        obs_stat_prob=0.0, checkpoint_every=2, verify_every=1)
    costs = sm.JobCosts(sm.EpisodeCost(0.0, 1.0, (), 0.0),
                        sm.UpdateCost(coord_eps=0.1, node_bandwidth=1e12, per_pair=1.0,
                                      per_coord=0.5, split_copy=0.0),
                        plan_per_pair=2.0, exchange_per_item=0.25, write_row=3.0,
                        write_checkpoint=8.0)
    lengths = sm.item_lengths([5], [1, 2, 3, 4, 5, 6])
    for assignment in sm.ROLLOUT:
        p = sm.predict(shape, costs, FREE, lengths, 1, assignment, "node_split")
        assert p.rollout == pytest.approx(26.0) and p.rollout_idle == 0.0
        assert p.plan == pytest.approx(6.0) and p.exchange == pytest.approx(0.25 * 7)
        assert p.update == pytest.approx(0.1 * 3 * 10 + 3 * 1.0 + 10 * 0.5)
        assert p.loop == pytest.approx(3.0 + 8.0 / 2)  # one collective-free row, half a ckpt
        assert p.iteration == pytest.approx(p.plan + p.rollout + p.exchange + p.update)
        assert p.total == pytest.approx(p.iteration + p.loop)
        assert p.ideal_rollout == pytest.approx(26.0 + 6.0) and p.lower_bound == 26.0


def test_collectives_by_hand():
    """Hockney: ceil(log2 P) latencies plus (P-1)/P of the bytes; nothing at one rank."""
    link = sm.Link(latency=1e-6, byte_time=1e-9)
    assert sm.allgather_seconds(link, 1, 1e6) == 0.0
    assert sm.allgather_seconds(link, 4, 1e6) == pytest.approx(2e-6 + 0.75e-3)
    assert sm.allgather_seconds(link, 5, 1e6) == pytest.approx(3e-6 + 0.8e-3)
    assert sm.allreduce_seconds(link, 4, 1e6) == pytest.approx(4e-6 + 1.5e-3)


def test_exchange_counts_the_rows_and_the_observation_statistics():
    """Two ranks: the rows (24 bytes an item), float observation sums of the recorded
    episodes, the busy seconds, each an allgather; integer frames go in one allreduce."""
    link = sm.Link(latency=1e-6, byte_time=1e-9)
    fabric = sm.Fabric(intra=link, inter=link, per_object=1e-7, fetch_intra=0.0,
                       fetch_inter=0.0, atomic_intra=0.0, atomic_inter=0.0, ranks_per_node=2)
    costs = sm.JobCosts(sm.EpisodeCost(0.0, 0.0, (), 0.0), sm.UpdateCost(0, 1, 0, 0, 0),
                        0.0, 1e-6, 0.0, 0.0)
    shape = sm.JobShape(n_pairs=100, n_eval=2, dim=1, obs_width=10, int_obs=False,
                        obs_stat_prob=0.05, checkpoint_every=1, verify_every=1)
    objects = sm.allgather_seconds(link, 2, 2 * sm.OBJECT_BYTES) + 2 * 1e-7
    rows = objects + sm.allgather_seconds(link, 2, 24 * 202)
    obs = objects + sm.allgather_seconds(link, 2, 10 * 8 * (2 + 20))  # 10 recorded episodes
    busy = sm.allgather_seconds(link, 2, 16)
    assert sm.exchange_seconds(shape, costs, fabric, 2) == pytest.approx(
        rows + obs + busy + 202e-6)
    frames = sm.JobShape(**{**shape.__dict__, "int_obs": True})
    assert sm.exchange_seconds(frames, costs, fabric, 2) == pytest.approx(
        rows + sm.allreduce_seconds(link, 2, 8 * 21) + busy + 202e-6)


def test_the_fabric_switches_to_the_network_beyond_one_node():
    fabric = sm.Fabric(intra=sm.Link(1e-6, 0.0), inter=sm.Link(5e-6, 0.0), per_object=0.0,
                       fetch_intra=1e-6, fetch_inter=4e-6, atomic_intra=1e-7,
                       atomic_inter=5e-7, ranks_per_node=4)
    assert fabric.link(4) is fabric.intra and fabric.link(5) is fabric.inter
    assert fabric.atomic_service(4) == 1e-7 and fabric.atomic_service(8) == 5e-7
    np.testing.assert_array_equal(fabric.fetch_latencies(6), [1e-6] * 4 + [4e-6] * 2)


def test_length_draws():
    rng = np.random.default_rng(0)
    falls = np.array([10, 20, 30])
    out = sm.late_mix(falls, 10_000, 1000, 0.7, rng)
    assert set(np.unique(out)) <= {10, 20, 30, 1000}
    assert abs((out == 1000).mean() - 0.7) < 0.02
    assert set(np.unique(sm.resample(falls, 100, rng))) <= {10, 20, 30}


def test_mean_prediction_averages_the_draws():
    shape = sm.JobShape(n_pairs=2, n_eval=0, dim=1, obs_width=1, int_obs=False,
                        obs_stat_prob=0.0, checkpoint_every=1, verify_every=0)
    costs = sm.JobCosts(sm.EpisodeCost(0.0, 1.0, (), 0.0), sm.UpdateCost(0, 1, 0, 0, 0),
                        0.0, 0.0, 0.0, 0.0)
    draws = iter([np.array([1, 1, 1, 1]), np.array([3, 3, 3, 3])])
    mean = sm.mean_prediction(lambda rng: next(draws), 2, 0, lambda lens: sm.predict(
        shape, costs, FREE, lens, 1, "static", "node_split"))
    assert mean.rollout == pytest.approx((4 + 12) / 2) and mean.ranks == 1


def test_predict_from_the_shipped_inputs(tmp_path):
    """bench/scale_model.py predicts from docs/scale_model_inputs.json: every variant at every
    rank count, the targets judged, the plot written."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    png = tmp_path / "scale.png"
    out = subprocess.run(
        [sys.executable, "bench/scale_model.py", "predict", "--samples", "1",
         "--jobs", "humanoid_dt,humanoid_openai", "--plot", str(png)],
        cwd=repo, capture_output=True, text=True, timeout=300, check=True).stdout
    assert "| 1440 |" in out and "dynamic + node_split" in out
    targets = [line for line in out.splitlines() if "(target <=" in line]
    assert len(targets) == 4, out
    assert all(": PASS" in line or ": MISS: " in line for line in targets), out
    assert png.stat().st_size > 10_000
