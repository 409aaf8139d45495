"""The tools as a first-time user meets them (collect, evaluate, pretrain): relative paths from
any folder, bad arguments named before any work (exit 2), video rendering with whichever
OpenGL backend works, progress in logs, and interrupted collections and pretrainings that a
rerun of the same command continues exactly."""
from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from es_mpi.config import ConfigError
from es_mpi.evaluate import Evaluation, format_table, parse_rtg, parse_size, parse_table
from es_mpi.progress import LineProgress

from mpi_helpers import REPO, child_env, mpirun, run_job


# ----------------------------------------------------------------------------- pure pieces
def test_progress_lines_are_rate_limited_with_an_eta():
    now = [0.0]
    out = io.StringIO()
    bar = LineProgress(1000, "pretrain", "steps", stream=out, clock=lambda: now[0])
    for _ in range(900):  # a step every 2 s: lines 5 s apart, then a tenth of the time so far
        now[0] += 2.0
        bar.update(1)
    lines = out.getvalue().splitlines()
    assert lines[0] == "pretrain: 3/1000 steps in 0:06 (0.5 steps/s, ETA 33:14)"
    times = [float(line.split()[1].split("/")[0]) * 2 for line in lines]
    gaps = np.diff(times)
    assert gaps.min() >= 5 and gaps.max() <= 62 and gaps[-1] >= 60  # at most 60 s apart
    assert len(lines) < 60
    now[0] += 1.0
    bar.close()
    assert out.getvalue().splitlines()[-1] == "pretrain: 900/1000 steps in 30:01 (0.5 steps/s)"


def test_the_target_return_column_only_for_a_policy_that_takes_one():
    rows = [Evaluation(None, np.array([1.0, 3.0]), np.array([10, 20]))]
    mlp_text = format_table(rows, 2, None)
    mlp = mlp_text.splitlines()
    assert "target" not in mlp[0] and "policy" not in mlp[2]
    assert mlp[2].split() == ["2", "2.00", "1.00", "15.0", "5.0"]
    dt = format_table(rows + [Evaluation(-1000.0, np.array([2.0]), np.array([5]))], 2, 6000.0)
    assert dt.splitlines()[0].split()[:2] == ["target", "return"]
    assert [line.split()[0] for line in dt.splitlines()[2:]] == ["6000", "-1000"]
    parsed = parse_table("es_mpi.evaluate: a line before\n" + mlp_text + "\n")
    assert parsed == [{"episodes": 2, "return mean": 2.0, "return std": 1.0, "length mean": 15.0,
                       "length std": 5.0}]
    assert [r["target return"] for r in parse_table(dt)] == [6000.0, -1000.0]
    with pytest.raises(ValueError, match="no es_mpi.evaluate table"):
        parse_table("nothing here")


def test_argument_formats_are_named():
    assert parse_rtg("-1000, 0,1e6") == [-1000.0, 0.0, 1e6] and parse_rtg(None) == [None]
    with pytest.raises(ConfigError, match="--rtg: expected comma-separated numbers"):
        parse_rtg("10,abc")
    assert parse_size("640x480") == (640, 480) and parse_size("96X96") == (96, 96)
    for bad in ("640by480", "640x", "0x480", "-1x2"):
        with pytest.raises(ConfigError, match="--video-size: expected WIDTHxHEIGHT"):
            parse_size(bad)


def test_a_missing_optional_package_names_its_extra():
    from es_mpi.extras import require

    with pytest.raises(ConfigError, match=r"--video needs the package 'no_such_pkg'; install "
                                          r"the 'tools' extra: pip install -e \"\.\[tools\]\""):
        require("no_such_pkg.sub", "tools", "--video")
    assert require("numpy", "tools", "x") is np


# ----------------------------------------------------------------------------- evaluate
@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A finished tiny quickstart run (MLP on InvertedPendulum)."""
    run = tmp_path_factory.mktemp("teacher") / "run"
    run_job(1, run, "es.population=6", "run.iterations=2", "es.eval_episodes=1", timeout=120)
    return run


def python(*args: str, cwd=REPO, env: dict | None = None, timeout: float = 120):
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env or child_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.mpi
def test_evaluate_argument_errors_exit_2_before_any_episode(teacher, tmp_path, capsys):
    from es_mpi.evaluate import main

    (tmp_path / "a_file").write_text("")
    cases = {("--rtg", "10,abc"): "--rtg: expected comma-separated numbers",
             ("--rtg", "10"): "--rtg needs a Decision Transformer",
             ("--episodes", "0"): "--episodes: must be at least 1, got 0",
             ("--max-steps", "0"): "--max-steps: must be at least 1",
             ("--video", str(tmp_path / "v.mp4"), "--video-size", "640by480"): "--video-size:",
             ("--video", str(tmp_path / "a_file" / "v.mp4")): "--video: cannot write",
             ("--video", str(tmp_path / "v.gif")): "--video: 'v.gif' should end in one of"}
    for args, message in cases.items():
        assert main([str(teacher), *args]) == 2, args
        err = capsys.readouterr()
        assert f"es_mpi: configuration error: {message}" in err.err, (args, err.err)
        assert "es_mpi.evaluate:" not in err.out  # nothing ran
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # no file left behind


@pytest.mark.mpi
def test_evaluate_shows_progress_and_no_target_column_for_an_mlp(teacher, capsys):
    from es_mpi.evaluate import main

    assert main([str(teacher), "--episodes", "3"]) == 0
    out = capsys.readouterr()
    head, _, row = out.out.splitlines()[1:4]
    assert head.split()[:3] == ["episodes", "return", "mean"] and row.split()[0] == "3"
    assert "evaluate: 3/3 episodes in" in out.err and "\r" not in out.err  # a log's lines


@pytest.mark.mpi
def test_video_renders_with_a_backend_that_works_here(teacher, tmp_path):
    imageio = pytest.importorskip("imageio.v2")
    env = child_env()
    env.pop("MUJOCO_GL", None)
    video = tmp_path / "videos" / "pendulum.mp4"  # its folder is made
    proc = python("-m", "es_mpi.evaluate", str(teacher), "--episodes", "1", "--max-steps",
                  "10", "--video", str(video), "--video-size", "64x48", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MUJOCO_GL=egl" in proc.stdout or "MUJOCO_GL=osmesa" in proc.stdout, proc.stdout
    frames = [f for f in imageio.get_reader(str(video))]
    assert len(frames) >= 2 and frames[0].shape == (48, 64, 3)
    assert np.asarray(frames[-1], np.float64).std() > 5  # a scene, not a blank frame


@pytest.mark.mpi
def test_a_backend_that_cannot_render_is_named_before_any_episode(teacher, tmp_path):
    env = child_env(MUJOCO_GL="glfw")  # needs a display: none on a headless machine
    env.pop("DISPLAY", None)
    env.pop("WAYLAND_DISPLAY", None)
    proc = python("-m", "es_mpi.evaluate", str(teacher), "--video", str(tmp_path / "v.mp4"),
                  env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    err = proc.stderr
    assert "es_mpi: configuration error: --video: MUJOCO_GL=glfw (set in your environment) " \
           "cannot render here" in err
    assert "apt-get install libegl1 libgl1-mesa-dri" in err and "libosmesa6" in err
    assert "evaluate:" not in err and not (tmp_path / "v.mp4").exists()


# ----------------------------------------------------------------------------- collect
minari_needed = pytest.mark.skipif(
    subprocess.run([sys.executable, "-c", "import minari"], capture_output=True).returncode != 0,
    reason="needs Minari (Python >= 3.11): pip install 'es_mpi[pretrain]'")

COLLECT = ("--episodes", "5", "--max-steps", "15", "--noise", "0.3")

# A collect that is killed (SIGKILL) inside its 3rd round, after Minari wrote the episode
# into main_data.hdf5 but before it updated metadata.json: the worst place to stop.
KILL_COLLECT = """
import os, signal, sys
from minari.dataset.minari_storage import MinariStorage
real = MinariStorage.update_metadata
def update_metadata(self, metadata):
    if metadata.get("total_episodes", 0) >= 3:
        os.kill(os.getpid(), signal.SIGKILL)
    real(self, metadata)
MinariStorage.update_metadata = update_metadata
from es_mpi.collect import main
sys.exit(main(sys.argv[1:]))
"""


def episodes_of(path) -> dict:
    from es_mpi.demos import load_demos

    d = load_demos(str(path))
    return {k: getattr(d, k) for k in ("observations", "actions", "rewards", "lengths")}


@minari_needed
@pytest.mark.mpi
def test_collect_with_a_relative_out_from_another_folder(teacher, tmp_path):
    """The README's commands name --out relative to the current folder."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    proc = mpirun(2, ["-m", "es_mpi.collect", str(teacher), *COLLECT, "--out", "demos/pendulum"],
                  cwd=cwd, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (cwd / "demos/pendulum/data/metadata.json").is_file()
    assert len(episodes_of(cwd / "demos/pendulum")["lengths"]) == 5
    again = python("-m", "es_mpi.collect", str(teacher), *COLLECT, "--out", "demos/pendulum",
                   cwd=cwd)  # the same command: nothing to do
    assert again.returncode == 0 and "already complete (5 episodes)" in again.stdout
    other = python("-m", "es_mpi.collect", str(teacher), *COLLECT, "--seed", "1", "--out",
                   "demos/pendulum", cwd=cwd)
    assert other.returncode == 2 and "seed: 0 in the dataset, 1 now" in other.stderr
    assert "--overwrite" in other.stderr and "Traceback" not in other.stderr


@minari_needed
@pytest.mark.mpi
@pytest.mark.slow
def test_an_interrupted_collect_is_refused_then_continued_exactly(teacher, dataset, tmp_path):
    cut = tmp_path / "cut"
    killed = python("-c", KILL_COLLECT, str(teacher), *COLLECT, "--out", str(cut))
    assert killed.returncode == -9, killed.stderr[-3000:]
    with h5py.File(cut / "data/main_data.hdf5") as f:  # an episode the metadata does not count
        assert len(f) == 3
    pre = python("-m", "es_mpi.pretrain", "jobs/quickstart_dt.yaml", "--data", str(cut),
                 "--steps", "2", "--out", str(tmp_path / "dt.h5"))
    assert pre.returncode == 2 and "interrupted es_mpi.collect (2 of 5 episodes)" in pre.stderr
    assert "--allow-incomplete" in pre.stderr and not (tmp_path / "dt.h5").exists()
    proc = mpirun(2, ["-m", "es_mpi.collect", str(teacher), *COLLECT, "--out", str(cut)],
                  timeout=120, check=True)  # the same command, at another rank count
    assert "continuing an interrupted collection at episode 2 of 5" in proc.stdout
    got, want = episodes_of(cut), episodes_of(dataset)  # the same command, uninterrupted
    for key in want:
        assert np.array_equal(got[key], want[key]), key


# ----------------------------------------------------------------------------- pretrain
PRETRAIN = ("jobs/quickstart_dt.yaml", "--steps", "24", "--set", "batch_size=4",
            "--eval-every", "8", "--eval-episodes", "0", "--threads", "1")

# A pretraining killed (SIGKILL) right after its 2nd partial checkpoint.
KILL_PRETRAIN = """
import os, signal, sys
from es_mpi import pretrain
real = pretrain.write_partial
def write_partial(path, job, args, loop, *rest):
    real(path, job, args, loop, *rest)
    if loop.done == 10:
        os.kill(os.getpid(), signal.SIGKILL)
pretrain.write_partial = write_partial
sys.exit(pretrain.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def dataset(teacher, tmp_path_factory) -> Path:
    pytest.importorskip("minari", reason="needs Minari: pip install 'es_mpi[pretrain]'")
    out = tmp_path_factory.mktemp("demos") / "pendulum"
    proc = python("-m", "es_mpi.collect", str(teacher), *COLLECT, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.mpi
@pytest.mark.slow
def test_a_killed_pretraining_continues_to_the_same_weights(dataset, tmp_path):
    whole = python("-m", "es_mpi.pretrain", *PRETRAIN, "--data", str(dataset),
                   "--checkpoint-every", "0", "--out", str(tmp_path / "whole.h5"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert "eval" not in whole.stdout and "eval=" not in whole.stderr  # --eval-episodes 0
    out = tmp_path / "cut" / "dt.h5"
    args = (*PRETRAIN, "--data", str(dataset), "--checkpoint-every", "5", "--out", str(out))
    killed = python("-c", KILL_PRETRAIN, *args)
    assert killed.returncode == -9 and not out.exists(), killed.stderr[-3000:]
    partial = out.with_name(out.name + ".partial.h5")
    with h5py.File(partial) as f:
        assert f.attrs["done"] == 10
    other = python("-m", "es_mpi.pretrain", *args, "--seed", "1")
    assert other.returncode == 2 and "differs in: seed" in other.stderr
    again = python("-m", "es_mpi.pretrain", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "continuing from 10 steps" in again.stdout and not partial.exists()
    with h5py.File(out) as a, h5py.File(tmp_path / "whole.h5") as b:
        assert a["theta"][()].tobytes() == b["theta"][()].tobytes()
        for name in ("step", "loss", "eval_step", "heldout_loss"):
            assert a[f"pretrain/{name}"][()].tobytes() == b[f"pretrain/{name}"][()].tobytes()


@pytest.mark.mpi
def test_pretrain_checks_its_output_before_training(dataset, tmp_path):
    (tmp_path / "a_file").write_text("")
    shutil.copytree(dataset, tmp_path / "demos")  # --data relative to the current folder
    proc = python("-m", "es_mpi.pretrain", str(REPO / PRETRAIN[0]), *PRETRAIN[1:], "--data",
                  "demos", "--out", "a_file/dt.h5", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "es_mpi: configuration error: --out: cannot write" in proc.stderr
    assert "pretrain:" not in proc.stderr  # no step was taken
    proc = python("-m", "es_mpi.pretrain", *PRETRAIN, "--data", str(dataset), "--eval-seed",
                  "-1", "--out", str(tmp_path / "dt.h5"))
    assert proc.returncode == 2 and "--eval-seed: must be at least 0, got -1" in proc.stderr
