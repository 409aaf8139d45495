"""The README's walk-through, as written, from a directory that is not the repository: the
quickstart, the pretraining walk-through (collect -> pretrain -> ES from the pretrained file),
evaluate (also with --rtg) and inspect. The commands are read from README.md, not copied here,
so a changed README is what runs; each gets options appended that shrink it to seconds (later
options and overrides win), nothing else changes."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mpi_helpers import REPO, child_env

README = REPO / "README.md"
# appended to each tool's command: a tiny version of the same command
TINY = {
    "es_mpi.run": "es.population=4 run.iterations=2 es.eval_episodes=1 env.max_episode_steps=50",
    "es_mpi.collect": "--episodes 4 --max-steps 50",
    "es_mpi.pretrain": "--steps 20 --eval-every 20 --eval-episodes 1 --eval-max-steps 50",
    "es_mpi.evaluate": "--episodes 2 --max-steps 50",
    "es_mpi.inspect": "",
}


def bash_blocks(section: str) -> list[list[str]]:
    """The command blocks of the README section whose heading (or bold lead-in) starts with
    `section`, up to the next heading; each a list of commands (continuations joined)."""
    text = README.read_text()
    start = text.index(section)
    end = text.find("\n#", start + len(section))
    part = text[start: end if end >= 0 else None]
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", part, re.S)
    return [[line for line in block.replace("\\\n", " ").splitlines() if line.strip()]
            for block in blocks]


def tiny(command: str) -> str:
    """The command without its comment, plus the options that shrink it."""
    words = shlex.split(command, comments=True)
    tool = next(w for w in words if w.startswith("es_mpi."))
    return " ".join([shlex.join(words), TINY[tool]]).replace("'", "")  # globs stay globs


def walk_through() -> list[str]:
    quickstart = bash_blocks("## Quickstart")[0]
    laptop = bash_blocks("**On a laptop**")[0]
    evaluate = [c for c in bash_blocks("### Evaluating a checkpoint")[0]
                if "--video" not in c and "ckpt_" not in c]  # video: a renderer; ckpt: 200 its
    reading = bash_blocks("## Reading results") or [[]]
    inspect = [c for c in (reading[0] if reading else []) if "--csv" not in c][:1]
    # evaluate and inspect the walk-through's own runs instead of the README's Humanoid ones
    evaluate = [c.replace("results/humanoid_dt", "results/quickstart_dt") for c in evaluate]
    inspect = [c.replace("results/humanoid_mlp/seed*", "results/quickstart*") for c in inspect]
    return quickstart + laptop + evaluate + inspect


def test_the_walk_through_is_found() -> None:
    commands = walk_through()
    tools = [next(w for w in shlex.split(c, comments=True) if w.startswith("es_mpi."))
             for c in commands]
    for tool in ("es_mpi.run", "es_mpi.collect", "es_mpi.pretrain", "es_mpi.evaluate"):
        assert tool in tools, f"README walk-through lost its {tool} command"
    assert any("--rtg" in c for c in commands) and any("run.init_from=" in c for c in commands)
    assert any("jobs/quickstart.yaml" in c for c in commands)


def test_a_shipped_job_path_works_from_any_directory(tmp_path: Path, monkeypatch) -> None:
    from es_mpi.config import ConfigError, load_job

    monkeypatch.chdir(tmp_path)
    assert load_job("jobs/quickstart.yaml").env.id == "InvertedPendulum-v5"
    with pytest.raises(ConfigError, match="does not exist"):
        load_job("jobs/no_such_job.yaml")
    (tmp_path / "jobs").mkdir()  # a job of the user's own, in the current directory, wins
    (tmp_path / "jobs" / "quickstart.yaml").write_text(
        (REPO / "jobs" / "quickstart.yaml").read_text().replace("population: 40", "population: 6"))
    assert load_job("jobs/quickstart.yaml").es.population == 6


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.timeout(300)
def test_readme_walk_through_runs_as_written_elsewhere(tmp_path: Path) -> None:
    pytest.importorskip("minari", reason="the pretraining walk-through needs Minari: "
                                         "pip install 'es_mpi[pretrain]'")
    env = child_env(PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    for command in walk_through():
        line = tiny(command)
        proc = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, (f"README command failed (exit {proc.returncode}) in "
                                      f"{tmp_path}:\n{line}\n{proc.stdout[-2000:]}\n"
                                      f"{proc.stderr[-2000:]}")
    assert (tmp_path / "pretrained" / "pendulum_dt.h5").is_file()
    assert sorted((tmp_path / "results" / "quickstart_dt" / "checkpoints").glob("ckpt_*.h5"))
