"""The protocol under real `mpiexec -n K`: invariance, failure handling, learning."""
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from es_mpi.results import COLUMNS, TIMING_COLUMNS
from mpi_helpers import REPO, TINY, child_env, final_theta_and_rows, mpirun, run_job

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("n, node_size", [(1, ""), (2, ""), (3, ""), (3, "2"), (2, "1"), (3, "1")])
def test_comm_primitives(n, node_size):
    proc = mpirun(n, [str(REPO / "tests/mpi_scripts/comm_checks.py")], timeout=90, check=True,
                  env=child_env(ES_MPI_NODE_SIZE=node_size))
    assert proc.stdout.count("comm checks passed") == n




# (ranks, run.update, run.assignment, pseudo-node size): dynamic (the default) and static work
# assignment; the node-split sum on one node of 2 and 3 ranks, on pseudo-nodes of 1, 2 (2 + 1
# ranks) and 3; the world-split sum (the default) on one node and on pseudo-nodes of 1 and 2;
# and the every-rank sum
LAYOUTS = {
    "n1": (1, "node_split", "dynamic", ""), "n2": (2, "node_split", "dynamic", ""),
    "n3": (3, "node_split", "dynamic", ""), "n3_nodes_of_1": (3, "node_split", "dynamic", "1"),
    "n3_nodes_of_2": (3, "node_split", "dynamic", "2"), "n3_nodes_of_3": (3, "node_split", "dynamic", "3"),
    "n2_static": (2, "node_split", "static", ""), "n3_static_nodes_of_2": (3, "node_split", "static", "2"),
    "n1_static": (1, "node_split", "static", ""), "n2_every_rank": (2, "every_rank", "dynamic", ""),
    "n3_world_nodes_of_1": (3, "world_split", "dynamic", "1"),
    "n3_world_nodes_of_2": (3, "world_split", "static", "2"), "n2_world": (2, "world_split", "dynamic", ""),
}


def test_theta_and_rows_are_bitwise_equal_at_1_2_and_3_ranks(tmp_path):
    finals = {}
    for name, (n, update, assignment, node_size) in LAYOUTS.items():
        proc = run_job(n, tmp_path / name, *TINY, "run.checkpoint_every=1",
                       f"run.update={update}", f"run.assignment={assignment}", timeout=120,
                       env=child_env(ES_MPI_NODE_SIZE=node_size))
        assert proc.stdout.count("iter ") == 3
        finals[name] = final_theta_and_rows(tmp_path / name, columns=None)
    theta1, rows1 = finals.pop("n1")
    assert theta1.dtype == np.float32 and theta1.size == 1249
    for name in finals:
        theta, rows = finals[name]
        assert np.array_equal(theta.view(np.uint32), theta1.view(np.uint32)), f"{name} differs"
        for key in COLUMNS:
            if key not in TIMING_COLUMNS:
                assert np.array_equal(rows[key], rows1[key]), (name, key)
    # the run really moved theta and really used the obs statistics
    with h5py.File(tmp_path / "n1" / "checkpoints" / "ckpt_000001.h5") as f:
        assert not np.array_equal(f["theta"][()], theta1)
    assert rows1["obs_count"][-1] > 1
    assert np.all((rows1["rollout_idle"] >= 0) & (rows1["rollout_idle"] < 1))


def test_results_file_has_the_public_columns(tmp_path):
    run_job(2, tmp_path, *TINY, timeout=90)
    with h5py.File(tmp_path / "results.h5") as f:
        grp = f["iterations"]
        for name in ("iteration", "timesteps", "wall_seconds", "fitness_mean", "fitness_max",
                     "eval_return"):
            assert grp[name].shape == (3,), name
        assert list(grp["iteration"][()]) == [0, 1, 2]
        assert np.all(np.diff(grp["timesteps"][()]) > 0)
    assert (tmp_path / "config.yaml").read_text().count("population: 6") == 1


def test_divergence_between_ranks_is_detected(tmp_path):
    proc = mpirun(2, [str(REPO / "tests/mpi_scripts/inject.py"), "diverge", "1", "1",
                      "jobs/quickstart.yaml", f"run.dir={tmp_path}", *TINY], timeout=90)
    assert proc.returncode != 0
    assert "theta diverged across ranks after iteration 1" in proc.stderr


# Key, value, run.dir and environment errors (unknown env.id, a bad env.kwargs) all come before
# torch is imported: < 5 s on 2 cores (measured ~1-2 s). The table-size check needs the policy
# built, so torch first (measured ~3 s on an idle 2-core machine): a looser bound.
@pytest.mark.parametrize("override, message, seconds", [
    ("es.sigmaa=0.1", "unknown key 'es.sigmaa'", 5),
    ("es.population=-5", "es.population: must be a positive integer, got -5", 5),
    ("env.id=Nope-v9", "env.id: cannot make environment 'Nope-v9'", 5),
    ("env.kwargs={reset_noise_scalee: 0.1}", "env.kwargs: 'InvertedPendulum-v5' rejected them", 5),
    ("es.noise_table_size=100", "es.noise_table_size=100 is smaller than the policy's 1,249", 15),
])
def test_bad_config_fails_fast_naming_the_key(tmp_path, override, message, seconds):
    start = time.monotonic()
    proc = run_job(2, tmp_path / "run", override, timeout=60, check=False)
    elapsed = time.monotonic() - start
    print(f"{override}: exit {proc.returncode} after {elapsed:.2f} s")
    assert elapsed < seconds
    assert proc.returncode == 2
    assert message in proc.stderr
    assert proc.stderr.count("configuration error") == 1  # said once, not once per rank
    assert not (tmp_path / "run").exists()


def test_environment_errors_come_before_torch_is_imported(tmp_path):
    code = f"""
import sys
from es_mpi.config import ConfigError, load_job
from es_mpi.runtime import preflight
for overrides in (["env.id=Nope-v9"], ["env.kwargs={{reset_noise_scalee: 0.1}}"],
                  ["env.id=ALE/Nope-v5", "env.normalize_obs=false"]):
    cfg = load_job("jobs/quickstart.yaml", [*overrides, "run.dir={tmp_path / 'run'}"])
    try:
        preflight(cfg, True)
        raise SystemExit(str(overrides) + ": no error")
    except ConfigError as exc:
        print(exc)
assert "torch" not in sys.modules, "torch was imported"
cfg = load_job("jobs/quickstart.yaml", ["run.dir={tmp_path / 'run'}"])
preflight(cfg, True).close()
assert "torch" not in sys.modules, "torch was imported"
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("env.id: cannot make environment") == 2
    assert "env.kwargs:" in proc.stdout
    assert not (tmp_path / "run").exists()


# rank 0 holds the dynamic assignment's counter: the others may be fetching from it
@pytest.mark.parametrize("rank, assignment", [(1, "dynamic"), (0, "dynamic"), (1, "static")])
def test_exception_on_one_rank_ends_the_job_with_its_traceback(tmp_path, rank, assignment):
    start = time.monotonic()
    proc = mpirun(3, [str(REPO / "tests/mpi_scripts/inject.py"), "raise", str(rank), "1",
                      "jobs/quickstart.yaml", f"run.dir={tmp_path}", *TINY,
                      "run.iterations=1000", f"run.assignment={assignment}"], timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert elapsed < 30
    assert f"rank {rank} of 3 failed" in proc.stderr
    assert f"RuntimeError: injected failure on rank {rank}" in proc.stderr


def test_setup_failure_on_one_rank_ends_the_job(tmp_path):
    """Not a config error, and only on one rank (a node without a ROM, say): no hang."""
    start = time.monotonic()
    proc = mpirun(3, [str(REPO / "tests/mpi_scripts/inject.py"), "setup", "2", "0",
                      "jobs/quickstart.yaml", f"run.dir={tmp_path}", *TINY], timeout=60)
    assert proc.returncode != 0
    assert time.monotonic() - start < 30
    assert "rank 2 of 3 failed" in proc.stderr
    assert "OSError: injected set-up failure on rank 2" in proc.stderr


@pytest.mark.slow
def test_quickstart_learns(tmp_path):
    proc = run_job(2, tmp_path, timeout=300)
    with h5py.File(tmp_path / "results.h5") as f:
        ev = f["iterations/eval_return"][()]
    assert len(ev) == 25, proc.stdout
    assert ev[-3:].mean() > max(200.0, 5 * ev[:3].mean()), ev
