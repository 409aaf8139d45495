"""Hero under real `mpiexec`: tiny runs, rank-count invariance, the VBN reference batch."""
import re

import h5py
import numpy as np
import pytest

from mpi_helpers import REPO, mpirun
from mpi_helpers import run_job as _run_job

from es_mpi.checkpoint import load_checkpoint, save_checkpoint
from es_mpi.config import loads
from es_mpi.envs import make_env
from es_mpi.envs_atari import random_policy_observations

# A seconds-long Hero run: 2 pairs, 60 agent steps per episode, a 20 MB noise table.
TINY_HERO = ("es.population=2", "run.iterations=2", "env.max_frames=240",
             "es.noise_table_size=5000000", "es.eval_episodes=1", "policy.vbn_batch=16",
             "run.checkpoint_every=1")


def run_job(n, run_dir, *overrides, job="jobs/atari_hero_cnn.yaml", timeout=120, check=True):
    return _run_job(n, run_dir, *overrides, job=job, timeout=timeout, check=check)


pytestmark = pytest.mark.mpi


def test_hero_cnn_vbn_bitwise_equal_at_1_and_2_ranks(tmp_path):
    finals = {}
    for n in (1, 2):
        proc = run_job(n, tmp_path / f"n{n}", *TINY_HERO, timeout=150)
        assert "policy cnn with 1,694,706 parameters" in proc.stdout
        assert proc.stdout.count("iter ") == 2
        finals[n], _ = load_checkpoint(tmp_path / f"n{n}" / "checkpoints" / "ckpt_000002.h5")
    one, two = finals[1], finals[2]
    assert np.array_equal(one.theta.view(np.uint32), two.theta.view(np.uint32))
    with h5py.File(tmp_path / "n1" / "checkpoints" / "ckpt_000001.h5") as f:
        assert not np.array_equal(f["theta"][()], one.theta)  # it really moved
    # the reference batch in the checkpoint is the one run.seed alone determines
    ref = one.extras["vbn_reference"]
    assert ref.shape == (16, 4, 84, 84) and ref.dtype == np.uint8
    assert np.array_equal(ref, two.extras["vbn_reference"])
    cfg = loads((tmp_path / "n2" / "config.yaml").read_text())
    assert np.array_equal(ref, random_policy_observations(make_env(cfg.env), cfg.run.seed, 16))


def test_vbn_reference_restored_from_checkpoint_on_every_rank(tmp_path):
    run_job(2, tmp_path, *TINY_HERO, "run.iterations=1", timeout=120)
    ckpt = tmp_path / "checkpoints" / "ckpt_000001.h5"
    proc = mpirun(2, [str(REPO / "tests/mpi_scripts/atari_vbn_resume.py"), str(ckpt)],
                  timeout=120, check=True)
    # digests are 16 hex digits: the launcher may run the two ranks' lines together
    lines = re.findall(r"rank (\d) ref ([0-9a-f]{16}) logits ([0-9a-f]{16})", proc.stdout)
    assert sorted(r for r, _, _ in lines) == ["0", "1"]
    assert len({(ref, logits) for _, ref, logits in lines}) == 1


def test_hero_cnn_without_vbn_at_2_ranks(tmp_path):
    proc = run_job(2, tmp_path, *TINY_HERO, "policy.vbn=false", "run.iterations=1", timeout=120)
    assert "policy cnn with 1,693,362 parameters" in proc.stdout
    state, _ = load_checkpoint(tmp_path / "checkpoints" / "ckpt_000001.h5")
    assert "vbn_reference" not in state.extras


def test_hero_dt_bitwise_equal_at_1_and_2_ranks_with_scoring_episodes(tmp_path):
    """The paper's Atari DT job, shrunk; 400 frames is long enough for some episodes to score,
    so the gathered returns (not only tie-broken ranks) drive the update. Half the episodes
    feed the per-pixel observation statistics (integer sums, one Allreduce)."""
    finals, rows = {}, {}
    for n in (1, 2):
        run_dir = tmp_path / f"n{n}"
        proc = run_job(n, run_dir, *TINY_HERO, "es.population=4", "env.max_frames=400",
                       "env.obs_stat_prob=0.5", job="jobs/atari_hero.yaml", timeout=240)
        count = int(re.search(r"with ([\d,]+) parameters", proc.stdout).group(1).replace(",", ""))
        assert count == 2_965_792  # max_timestep 10,000 as the authors (docs/fidelity.md)
        assert proc.stdout.count("iter ") == 2
        finals[n], _ = load_checkpoint(run_dir / "checkpoints" / "ckpt_000002.h5")
        with h5py.File(run_dir / "results.h5") as f:
            rows[n] = {k: f["iterations"][k][()] for k in ("fitness_mean", "fitness_max",
                                                            "timesteps", "eval_return")}
    assert rows[1]["fitness_max"].max() > 0, "no episode scored: the test would not see returns"
    for key in rows[1]:
        assert np.array_equal(rows[1][key], rows[2][key]), key
    assert np.array_equal(finals[1].theta.view(np.uint32), finals[2].theta.view(np.uint32))
    stats = finals[2].obs_stats
    assert stats.sum.shape == (4, 84, 84) and stats.count > 100  # per pixel, really gathered
    assert np.array_equal(stats.sum, finals[1].obs_stats.sum)
    assert np.array_equal(stats.sumsq, finals[1].obs_stats.sumsq)


def test_resumed_run_keeps_the_checkpointed_reference_batch(tmp_path):
    run_job(2, tmp_path, *TINY_HERO, "run.iterations=1", timeout=120)
    ckpt = tmp_path / "checkpoints" / "ckpt_000001.h5"
    state, text = load_checkpoint(ckpt)  # rewritten with a batch the run could not collect
    ref = np.ascontiguousarray(state.extras["vbn_reference"][::-1])
    state.extras["vbn_reference"] = ref
    save_checkpoint(ckpt, state, text)
    run_job(2, tmp_path, *TINY_HERO, "run.iterations=2", timeout=120)
    state, _ = load_checkpoint(tmp_path / "checkpoints" / "ckpt_000002.h5")
    assert np.array_equal(state.extras["vbn_reference"], ref)
