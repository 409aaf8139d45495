"""The slurm/ templates' sizes come from the scale model (`python -m es_mpi.scale_model JOB
--ntasks N`): the template's --time, --signal and --mem-per-cpu are what it prints for the
template's --ntasks, so neither can drift from the other."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from es_mpi import scale_model as sm
from es_mpi.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = ("humanoid_mlp", "humanoid_dt", "atari_hero")


@pytest.fixture(scope="module")
def inputs() -> dict:
    return json.loads(sm.DEFAULT_INPUTS.read_text())


def directives(name: str) -> list[str]:
    text = (REPO / "slurm" / f"{name}.sh").read_text()
    return re.findall(r"^#SBATCH\s+(\S+)", text, flags=re.M)


def ntasks(name: str) -> int:
    return int(next(d for d in directives(name) if d.startswith("--ntasks=")).split("=")[1])


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_sizes_are_the_derived_ones(name: str, inputs: dict) -> None:
    found = directives(name)
    sizing = sm.suggest(REPO / "jobs" / f"{name}.yaml", ntasks(name), inputs)
    for wanted in sizing.directives():
        assert wanted in found, f"slurm/{name}.sh: expected #SBATCH {wanted} (scale model)"
    assert "--hint=nomultithread" in found
    # several seeds side by side on a 300-core share (ten for Humanoid), and no iteration (what
    # a preemption can lose) longer than a few hours
    assert ntasks(name) * (3 if name.startswith("atari") else 10) <= 300
    assert sizing.late <= 3 * 3600
    # the signal comes after the longest iteration and its checkpoint could start
    assert sizing.signal_s > sizing.late + inputs["jobs"][name]["costs"]["write_checkpoint"]
    assert 2 * sizing.signal_s <= sizing.time_s


def test_command_prints_the_template_lines_from_any_directory(tmp_path: Path, inputs) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "es_mpi.scale_model", "jobs/humanoid_mlp.yaml",
                          "--ntasks", str(ntasks("humanoid_mlp"))], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    printed = re.findall(r"^#SBATCH\s+(\S+)", out.stdout, flags=re.M)
    assert printed and set(printed) <= set(directives("humanoid_mlp"))
    assert "jobs/humanoid_mlp.yaml at" in out.stdout


@pytest.mark.parametrize("args,says", [
    (["jobs/humanoid_mlp.yaml", "--ntasks", "0"], "--ntasks"),
    (["jobs/humanoid_mlp.yaml", "--ntasks", "8", "--inputs", "/nonexistent.json"], "--inputs"),
    (["jobs/no_such_job.yaml", "--ntasks", "8"], "does not exist"),
    (["jobs/atari_hero_cnn.yaml", "--ntasks", "8"], "no measured costs"),
    (["jobs/humanoid_mlp.yaml", "--ntasks", "8", "es.sigmaa=1"], "es.sigmaa"),
])
def test_bad_input_is_a_named_configuration_error(args: list, says: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "es_mpi.scale_model", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "es_mpi: configuration error" in out.stderr
    assert says in out.stderr


def test_variants_of_a_paper_job_use_its_measured_costs(inputs: dict) -> None:
    from es_mpi.config import load_job

    for job, measured in (("humanoid_dt_rtg", "humanoid_dt"),
                          ("humanoid_dt_half_population", "humanoid_dt"),
                          ("atari_hero_no_norm", "atari_hero"), ("humanoid_mlp", "humanoid_mlp")):
        path = REPO / "jobs" / f"{job}.yaml"
        assert sm.measured_job(load_job(path), path, inputs["jobs"]) == measured
    path = REPO / "jobs" / "atari_hero_cnn.yaml"
    with pytest.raises(ConfigError, match="no measured costs"):
        sm.measured_job(load_job(path), path, inputs["jobs"])


def test_fewer_tasks_mean_longer_iterations_and_leads(inputs: dict) -> None:
    job = REPO / "jobs" / "humanoid_dt.yaml"
    small, big = sm.suggest(job, 30, inputs), sm.suggest(job, 300, inputs)
    assert small.late > 5 * big.late and small.signal_s > big.signal_s
    assert small.mem_mib == big.mem_mib


def test_rules() -> None:
    assert sm.signal_lead(100.0, 1.0) == 300  # 1.5 x 101 s + 120 s = 271.5 s -> 5 min
    assert sm.time_limit(3600.0, 300, 24 * 3600) == (6300, 1)  # 1.5 x 3720 s + 300 s -> 1.75 h
    time_s, runs = sm.time_limit(100 * 3600.0, 3000, 24 * 3600)
    assert time_s == 24 * 3600 and runs == 7  # 150 h of padded work in runs of ~23.9 h
    assert sm.mem_per_cpu(400, 250_000_000) == 1536  # 500 + 954 MiB -> 1,536
    assert sm.hms(90061) == "25:01:01"


def test_readme_shows_what_the_command_prints(inputs: dict) -> None:
    readme = (REPO / "README.md").read_text()
    shown = re.search(r"```\n((jobs/\S+) at (\d+) tasks .*?)```", readme, re.S)
    assert shown, "README lost its sizing example"
    job, tasks = shown.group(2), shown.group(3)
    assert f"python -m es_mpi.scale_model {job} --ntasks {tasks}" in readme
    assert shown.group(1).strip() == sm.report(sm.suggest(job, int(tasks), inputs))


def test_a_job_named_like_a_paper_job_needs_its_policy_too(tmp_path: Path, inputs) -> None:
    from es_mpi.config import load_job

    path = tmp_path / "humanoid_dt.yaml"  # the Humanoid MLP under the DT's name
    path.write_text((REPO / "jobs" / "humanoid_mlp.yaml").read_text())
    assert sm.measured_job(load_job(path), path, inputs["jobs"]) == "humanoid_mlp"


def test_readme_resize_examples_use_the_derived_sizes(inputs: dict) -> None:
    readme = (REPO / "README.md").read_text()
    found = re.findall(r"sbatch --ntasks=(\d+) --time=(\S+) --signal=(\S+) slurm/(\w+)\.sh",
                       readme)
    assert found, "README lost its resize example"
    for tasks, time, signal, name in found:
        sizing = sm.suggest(f"jobs/{name}.yaml", int(tasks), inputs)
        assert [f"--time={time}", f"--signal={signal}"] == sizing.directives()[1:3]
