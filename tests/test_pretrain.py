"""Pretraining end to end, as a user runs it: an ES-trained MLP teacher on InvertedPendulum,
its episodes collected as a Minari dataset (at 1 and 2 ranks, the same), a small Decision
Transformer pretrained on them (es_mpi.evaluate: >= 90 % of the teacher's return), then ES
fine-tuning from it, starting bitwise from the pretrained theta at 1 and 2 ranks. Bad input
is a named error (exit 2) before any MPI work."""
from __future__ import annotations

import re
import subprocess
import sys

import h5py
import numpy as np
import pytest

from es_mpi.evaluate import parse_table
from mpi_helpers import REPO, child_env, mpirun, run_job

pytestmark = [pytest.mark.mpi, pytest.mark.slow]
pytest.importorskip("minari", reason="pretraining needs Minari (Python >= 3.11): "
                                      "pip install 'es_mpi[pretrain]'")

PENDULUM_DT = ("es.population=4", "env.max_episode_steps=100", "es.eval_episodes=1",
               "run.iterations=2", "run.checkpoint_every=1")


def python(*args: str, timeout: float = 120, env: dict | None = None,
           check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env or child_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def mean_return(evaluate_output: str) -> float:
    """The last row's return mean."""
    return parse_table(evaluate_output)[-1]["return mean"]


@pytest.fixture(scope="module")
def pendulum(tmp_path_factory):
    """teacher run dir, its 50-episode dataset, the pretrained DT, the teacher's return."""
    root = tmp_path_factory.mktemp("pendulum")
    run_job(2, root / "teacher", "run.iterations=15", timeout=240)
    teacher = mean_return(python("-m", "es_mpi.evaluate", str(root / "teacher"),
                                 "--episodes", "5").stdout)
    mpirun(2, ["-m", "es_mpi.collect", str(root / "teacher"), "--episodes", "50", "--noise",
               "0.5", "--out", str(root / "demos")], timeout=240, check=True)
    out = python("-m", "es_mpi.pretrain", "jobs/quickstart_dt.yaml", "--data",
                 str(root / "demos"), "--steps", "1500", "--out", str(root / "dt.h5"),
                 "--set", "lr=1e-3", "--set", "warmup_steps=100", "--eval-every", "500",
                 "--eval-episodes", "2", "--threads", "1", timeout=300).stdout
    return dict(root=root, teacher=teacher, demos=root / "demos", pretrained=root / "dt.h5",
                log=out)


def test_pretrained_dt_reaches_nine_tenths_of_the_teacher(pendulum):
    assert pendulum["teacher"] >= 900  # the quickstart MLP balances the pendulum
    ev = python("-m", "es_mpi.evaluate", str(pendulum["pretrained"]), "--episodes", "5").stdout
    assert "policy dt with" in ev
    assert mean_return(ev) >= 0.9 * pendulum["teacher"], (ev, pendulum["log"])
    with h5py.File(pendulum["pretrained"]) as f:  # the loss fell and was recorded
        loss, held = f["pretrain/loss"][()], f["pretrain/heldout_loss"][()]
        assert loss[-1] < 0.3 * loss[0] and np.isfinite(held).all()
        assert f["pretrain"].attrs["dataset_episodes"] == 50
        assert f["pretrain"].attrs["heldout_episodes"] == 2
        assert f["obs_stats"].attrs["count"] > 50_000  # the dataset's statistics


def test_an_mlp_regresses_on_the_same_dataset(pendulum, tmp_path):
    proc = python("-m", "es_mpi.pretrain", "jobs/quickstart.yaml", "--data", str(pendulum["demos"]),
                  "--steps", "600", "--eval-every", "600", "--eval-episodes", "2", "--threads",
                  "1", "--out", str(tmp_path / "mlp.h5"))
    assert "policy mlp with 1,249 parameters" in proc.stdout and "'batch_size': 256" in proc.stdout
    ev = python("-m", "es_mpi.evaluate", str(tmp_path / "mlp.h5"), "--episodes", "3").stdout
    assert mean_return(ev) >= 0.9 * pendulum["teacher"], proc.stdout


def test_collected_dataset_loads_with_minaris_own_api(pendulum, monkeypatch):
    import minari

    ds = minari.MinariDataset(pendulum["demos"] / "data")
    assert ds.total_episodes == 50 and ds.total_steps == 50_000
    assert ds.spec.dataset_id == "demos-v0" and ds.observation_space.shape == (4,)
    ep = next(ds.iterate_episodes([0]))
    assert ep.observations.shape == (1001, 4) and ep.actions.shape == (1000, 1)
    assert np.all(np.abs(ep.actions) <= 3.0)  # applied actions: inside the force range
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(pendulum["root"]))
    assert minari.load_dataset("demos").total_episodes == 50


def test_collection_is_the_same_at_1_and_2_ranks(pendulum, tmp_path):
    from es_mpi.demos import load_demos

    sets = {}
    for n in (1, 2):
        mpirun(n, ["-m", "es_mpi.collect", str(pendulum["root"] / "teacher"), "--episodes", "3",
                   "--max-steps", "40", "--noise", "0.3", "--out", str(tmp_path / f"n{n}")],
               timeout=120, check=True)
        sets[n] = load_demos(str(tmp_path / f"n{n}"))
    for key in ("observations", "actions", "rewards", "lengths"):
        assert np.array_equal(getattr(sets[1], key), getattr(sets[2], key)), key


def test_finetune_starts_from_the_pretrained_theta_at_1_and_2_ranks(pendulum, tmp_path):
    from es_mpi.checkpoint import load_checkpoint
    from es_mpi.comm import theta_digest

    pre, _ = load_checkpoint(pendulum["pretrained"])
    init = f"run.init_from={pendulum['pretrained']}"
    finals = {}
    for n in (1, 2):
        proc = mpirun(n, [str(REPO / "tests/mpi_scripts/init_state.py"), "jobs/quickstart_dt.yaml",
                          f"run.dir={tmp_path / f'probe{n}'}", init, *PENDULUM_DT],
                      timeout=120, check=True)
        lines = re.findall(r"rank (\d) iteration 0 theta ([0-9a-f]{16}) obs ([0-9a-f]{16}) "
                           r"count ([\d.e+]+)", proc.stdout)
        assert sorted(r for r, *_ in lines) == [str(r) for r in range(n)], proc.stdout
        assert {(t, o, float(c)) for _, t, o, c in lines} == {
            (theta_digest(pre.theta), theta_digest(pre.obs_stats.sum), pre.obs_stats.count)}
        run_job(n, tmp_path / f"n{n}", init, *PENDULUM_DT, job="jobs/quickstart_dt.yaml")
        finals[n], _ = load_checkpoint(tmp_path / f"n{n}" / "checkpoints" / "ckpt_000002.h5")
    assert np.array_equal(finals[1].theta.view(np.uint32), finals[2].theta.view(np.uint32))
    assert not np.array_equal(finals[1].theta, pre.theta)


def test_a_finetuned_run_evaluates_without_its_pretrained_file(pendulum, tmp_path):
    """Only training reads run.init_from: a fine-tuned run moved elsewhere, its pretrained
    file gone, still evaluates."""
    import shutil

    pre = tmp_path / "dt.h5"
    shutil.copy(pendulum["pretrained"], pre)
    run_job(1, tmp_path / "run", f"run.init_from={pre}", *PENDULUM_DT,
            job="jobs/quickstart_dt.yaml")
    pre.unlink()
    shutil.move(tmp_path / "run", tmp_path / "moved")
    out = python("-m", "es_mpi.evaluate", str(tmp_path / "moved"), "--episodes", "1").stdout
    assert np.isfinite(mean_return(out))


def test_resume_ignores_init_from_and_refuses_another(pendulum, tmp_path):
    copy = tmp_path / "dt.h5"
    copy.write_bytes(pendulum["pretrained"].read_bytes())
    run_job(1, tmp_path / "run", f"run.init_from={copy}", *PENDULUM_DT, "run.iterations=1",
            job="jobs/quickstart_dt.yaml")
    copy.unlink()  # the checkpoint wins: the file is no longer needed
    proc = run_job(1, tmp_path / "run", f"run.init_from={copy}", *PENDULUM_DT,
                   job="jobs/quickstart_dt.yaml")
    assert "resuming from" in proc.stdout and proc.stdout.count("iter ") == 1
    proc = run_job(1, tmp_path / "run", f"run.init_from={pendulum['pretrained']}", *PENDULUM_DT,
                   "run.iterations=3", job="jobs/quickstart_dt.yaml", check=False)
    assert proc.returncode == 2 and "run.init_from:" in proc.stderr


def test_init_from_of_another_policy_is_named_before_mpi_work(pendulum, tmp_path):
    proc = run_job(2, tmp_path / "r", f"run.init_from={pendulum['pretrained']}",
                   "policy.n_embd=16", *PENDULUM_DT, job="jobs/quickstart_dt.yaml", check=False)
    assert proc.returncode == 2
    err = proc.stderr
    assert "configuration error: run.init_from:" in err and "policy.n_embd: 32 in the file, 16" \
        in err and "parameters, the job's policy" in err
    assert not (tmp_path / "r").exists()  # nothing was started
    proc = run_job(1, tmp_path / "r", "run.init_from=nowhere/dt.h5", job="jobs/quickstart_dt.yaml",
                   check=False)
    assert proc.returncode == 2 and "run.init_from: no such file 'nowhere/dt.h5'" in proc.stderr


def test_pretrain_names_a_dataset_of_other_spaces_and_a_missing_one(pendulum, tmp_path):
    proc = python("-m", "es_mpi.pretrain", "jobs/humanoid_dt.yaml", "--data",
                  str(pendulum["demos"]), "--steps", "1", "--out", str(tmp_path / "x.h5"),
                  check=False)
    assert proc.returncode == 2
    assert "its observation space Box(shape (4,), float64) does not match the job's " \
           "Box(shape (376,), float64)" in proc.stderr
    proc = python("-m", "es_mpi.pretrain", "jobs/quickstart_dt.yaml", "--data",
                  str(tmp_path / "missing"), "--steps", "1", "--out", str(tmp_path / "x.h5"),
                  check=False)
    assert proc.returncode == 2 and "no Minari dataset at" in proc.stderr
    assert not (tmp_path / "x.h5").exists()
    proc = mpirun(2, ["-m", "es_mpi.collect", str(pendulum["root"] / "teacher"), "--episodes",
                      "2", "--max-steps", "-1", "--out", str(tmp_path / "demos")], timeout=120)
    assert proc.returncode == 2 and "--max-steps: must be at least 1, got -1" in proc.stderr
    assert not (tmp_path / "demos").exists()
    (tmp_path / "a_file").write_text("")  # --out below a file: the folder cannot be made
    proc = mpirun(2, ["-m", "es_mpi.collect", str(pendulum["root"] / "teacher"), "--episodes",
                      "2", "--out", str(tmp_path / "a_file" / "demos")], timeout=120)
    assert proc.returncode == 2 and "--out: cannot write the dataset at" in proc.stderr, \
        proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_pretrained_file_is_the_documented_format(pendulum):
    """docs/results-format.md: a checkpoint's names plus the `pretrain/` group, both ways."""
    from _mpirun_persist import _pattern, documented, file_names

    doc = {**documented("Checkpoint"), **documented("Pretrained policy")}
    names = file_names(pendulum["pretrained"])
    for name, (kind, _) in names.items():
        hits = [d for d in doc if _pattern(d).match(name)]
        assert hits and doc[hits[0]]["kind"] == kind, f"{name} ({kind}) is not documented"
    for d in documented("Pretrained policy"):
        assert "<" in d or d in names, f"{d} is documented but not written"


def test_a_dataset_made_with_minaris_data_collector_pretrains(tmp_path):
    """Minari's own tools (DataCollector on a gymnasium env, a dataset id in the local store)."""
    pytest.importorskip("jax", reason="Minari's DataCollector needs jax: pip install "
                                      "'es_mpi[create]' (not in the test extra)")
    env = child_env(MINARI_DATASETS_PATH=str(tmp_path / "store"))
    script = (
        "import gymnasium as gym, minari\n"
        "env = minari.DataCollector(gym.make('InvertedPendulum-v5'))\n"
        "for i in range(4):\n"
        "    env.reset(seed=i); env.action_space.seed(i)\n"
        "    for _ in range(60):\n"
        "        *_, te, tr, _ = env.step(env.action_space.sample())\n"
        "        if te or tr: break\n"
        "env.create_dataset(dataset_id='pendulum/random-v0', algorithm_name='random',\n"
        "                   author='es_mpi tests', author_email='-', code_permalink='-',\n"
        "                   description='random actions')\n")
    python("-c", script, env=env, timeout=120)
    proc = python("-m", "es_mpi.pretrain", "jobs/quickstart_dt.yaml", "--data",
                  "pendulum/random-v0", "--steps", "20", "--set", "batch_size=8", "--eval-episodes", "1",
                  "--eval-max-steps", "50", "--threads", "1", "--out", str(tmp_path / "dt.h5"),
                  env=env, timeout=120)
    assert "pendulum/random-v0: 4 episodes" in proc.stdout
    assert re.search(r"20 steps in [\d.]+ s", proc.stdout)
    with h5py.File(tmp_path / "dt.h5") as f:
        assert f["pretrain"].attrs["dataset"] == "pendulum/random-v0"


def test_a_stable_baselines3_teacher(tmp_path):
    pytest.importorskip("stable_baselines3", reason="optional: pip install 'es_mpi[sb3]'")
    from es_mpi.demos import load_demos

    python("-c", "import gymnasium as gym; from stable_baselines3 import PPO\n"
           f"PPO('MlpPolicy', gym.make('InvertedPendulum-v5'), seed=0).save('{tmp_path}/ppo')",
           timeout=120)
    mpirun(2, ["-m", "es_mpi.collect", str(tmp_path / "ppo.zip"), "--sb3", "PPO", "--job",
               "jobs/quickstart.yaml", "--episodes", "3", "--max-steps", "30", "--out",
               str(tmp_path / "demos")], timeout=120, check=True)
    d = load_demos(str(tmp_path / "demos"))
    assert d.episodes == 3 and d.es_mpi_meta("teacher")["algorithm"] == "PPO"
    from stable_baselines3 import PPO
    model = PPO.load(tmp_path / "ppo.zip", device="cpu")
    want = np.clip(model.predict(d.observations, deterministic=True)[0], -3, 3)
    assert np.allclose(d.actions, want, atol=1e-6)  # the model's own (applied) actions
    proc = python("-m", "es_mpi.collect", str(tmp_path / "ppo.zip"), "--sb3", "PPO",
                  "--episodes", "1", "--out", str(tmp_path / "x"), check=False)
    assert proc.returncode == 2 and "--job" in proc.stderr


def test_atari_dt_pretrains_on_hero_episodes_of_an_es_mpi_checkpoint(tmp_path):
    """The Atari variant, tiny: Hero episodes of an es_mpi CNN checkpoint, the paper's image
    DT (shrunk) pretrained on them with cross-entropy, read back by es_mpi.evaluate."""
    from es_mpi.checkpoint import TrainState, save_checkpoint
    from es_mpi.config import load_job
    from es_mpi.envs import make_env
    from es_mpi.es import ObsStats, OptimizerState
    from es_mpi.policies import make_policy
    from es_mpi.results import COLUMNS

    cfg = load_job(REPO / "jobs/atari_hero_cnn.yaml", ["policy.vbn=false"])
    env = make_env(cfg.env)
    pol = make_policy(cfg.policy, env.observation_space, env.action_space, 0)
    theta = pol.get_theta()
    save_checkpoint(tmp_path / "teacher" / "checkpoints" / "ckpt_000001.h5", TrainState(
        1, theta, OptimizerState.zeros(theta.size), ObsStats.empty((4, 84, 84)),
        np.zeros(0, np.int64), results={k: np.zeros(1, d) if k != "iteration" else np.arange(1)
                                        for k, (d, _, _) in COLUMNS.items()}), cfg.to_yaml())
    mpirun(2, ["-m", "es_mpi.collect", str(tmp_path / "teacher"), "--episodes", "2",
               "--max-steps", "24", "--noise", "0.1", "--out", str(tmp_path / "hero")],
           timeout=120, check=True)
    small = ["policy.n_layer=1", "policy.context=4", "policy.max_ep_len=100"]
    proc = python("-m", "es_mpi.pretrain", "jobs/atari_hero.yaml", *small, "--data",
                  str(tmp_path / "hero"), "--steps", "4", "--set", "batch_size=4",
                  "--eval-episodes", "1", "--eval-max-steps", "10", "--threads", "1",
                  "--out", str(tmp_path / "hero_dt.h5"), timeout=180)
    assert "ALE/Hero-v5, policy dt" in proc.stdout and "'window_time': 'first'" in proc.stdout
    with h5py.File(tmp_path / "hero_dt.h5") as f:
        assert f["obs_stats/sum"].shape == (4, 84, 84) and f["obs_stats"].attrs["count"] > 48
        assert np.isfinite(f["pretrain/loss"][()]).all()
    ev = python("-m", "es_mpi.evaluate", str(tmp_path / "hero_dt.h5"), "--episodes", "1",
                "--max-steps", "10", timeout=120)
    assert "policy dt with" in ev.stdout
