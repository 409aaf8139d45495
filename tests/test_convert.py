"""es_mpi.convert on the authors' published Humanoid models (tests/data, MIT: README there):
the converted files evaluate to the returns recorded from them (300 steps, seed 0), record
their job, normalise as the authors' statistics do, start a run through run.init_from, and
bad input is a named error before anything is written."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mpi_helpers import REPO, child_env, mpirun, run_job

from es_mpi.checkpoint import load_checkpoint
from es_mpi.config import ConfigError, loads
from es_mpi.convert import convert
from es_mpi.evaluate import Evaluator, parse_table, read_checkpoint

DATA = REPO / "tests" / "data"
STEPS = 300
# `es_mpi.evaluate FILE --episodes 1 --max-steps 300` (seed 0) of each converted model, recorded
# once with MuJoCo 4.0.1 (another engine version moves them). A transposed square matrix of
# the MLP falls in 14 steps (return 62); the DT's attention projection left untransposed
# returns 1480.5 here, so its mapping is checked exactly against their layout below too
REFERENCE = {"es_ff_humanoid_1.model": 2101.410269076781,
             "es_dt_humanoid_1.model": 1474.089952708456}


def evaluate(path: Path, steps: int = STEPS) -> float:
    """The command a user runs (a process of its own: its CPU kernels pinned before torch
    loads, whatever this test process imported first)."""
    proc = subprocess.run([sys.executable, "-m", "es_mpi.evaluate", str(path), "--episodes",
                           "1", "--max-steps", str(steps)], cwd=path.parent, env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return parse_table(proc.stdout)[-1]["return mean"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("converted")
    return {name: convert(DATA / name, out / f"{Path(name).stem}.h5")
            for name in ("es_ff_humanoid_1.model", "es_dt_humanoid_1.model",
                         "humanoid_bc.ckpt")}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_converted_model_returns_the_recorded_return(converted, name):
    assert evaluate(converted[name]) == pytest.approx(REFERENCE[name], rel=1e-3)


def test_converted_files_record_their_job_and_source(converted):
    jobs = {"es_ff_humanoid_1.model": ("mlp", 166_673, "results/humanoid_mlp/seed0"),
            "es_dt_humanoid_1.model": ("dt", 824_970, "results/humanoid_dt"),
            "humanoid_bc.ckpt": ("dt", 824_970, "results/humanoid_dt_pretrained")}
    for name, (kind, size, run_dir) in jobs.items():
        state, text = load_checkpoint(converted[name])
        cfg = loads(text)
        assert (cfg.policy.kind, state.theta.size, cfg.run.dir) == (kind, size, run_dir)
        assert cfg.env.id == "Humanoid-v4" and cfg.run.init_from is None
        assert state.iteration == 0 and state.opt.step == 0
        with h5py.File(converted[name], "r") as f:
            attrs = dict(f["convert"].attrs)
        assert attrs["source"].endswith(name)
        ignored = json.loads(attrs["ignored_keys"])
        assert ignored == ([] if kind == "mlp" else sorted(
            [f"transformer.h.{i}.attn.{b}" for i in range(3) for b in ("bias", "masked_bias")]
            + ["transformer.wte.weight"]))


def test_normalisation_is_the_authors(converted):
    """Their mean and std from the .vbns; the BC model: raw observations (mean 0, std 1)."""
    for name in ("es_ff_humanoid_1", "es_dt_humanoid_1"):
        ev = Evaluator(read_checkpoint(converted[f"{name}.model"]))
        with np.load(DATA / f"{name}.vbns") as vbns:
            np.testing.assert_allclose(ev.normalize.mean, vbns["mean"], rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(ev.normalize.std, vbns["std"], rtol=1e-6)
        ev.env.close()
    state, _ = load_checkpoint(converted["humanoid_bc.ckpt"])
    assert np.all(state.obs_stats.mean == 0) and np.all(state.obs_stats.std() == 1)


def test_converted_file_is_the_documented_format(converted):
    """docs/results-format.md: a checkpoint's names plus the `convert/` group, both ways."""
    from _mpirun_persist import _pattern, documented, file_names

    doc = {**documented("Checkpoint"), **documented("Converted model")}
    for path in (converted["es_dt_humanoid_1.model"], converted["humanoid_bc.ckpt"]):
        names = file_names(path)
        for name, (kind, _) in names.items():
            hits = [d for d in doc if _pattern(d).match(name)]
            assert hits and doc[hits[0]]["kind"] == kind, f"{name} ({kind}) is not documented"
        for d in documented("Converted model"):
            assert d in names, f"{d} is documented but not written"


# ----------------------------------------------------------------------------- their layout
def authors_state(name: str) -> dict:
    sd = torch.load(DATA / name, weights_only=True)
    return {k.removeprefix("model."): v.double().numpy() for k, v in sd.items()}


def layer_norm(x, sd, key):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * sd[f"{key}.weight"] + sd[f"{key}.bias"]


def linear(x, sd, key):  # torch Linear: weight (out, in)
    return x @ sd[f"{key}.weight"].T + sd[f"{key}.bias"]


def conv1d(x, sd, key):  # Hugging Face Conv1D: weight (in, out)
    return x @ sd[f"{key}.weight"] + sd[f"{key}.bias"]


def authors_dt_actions(sd, rtg, states, actions, t):
    """Their DT's actions at every state token, from their keys and layouts (numpy, float64,
    one head, no dropout): the reference the converted policy must reproduce."""
    time = sd["embed_timestep.weight"][t]
    tokens = np.stack([linear(rtg[:, None], sd, "embed_return") + time,
                       linear(states, sd, "embed_state") + time,
                       linear(actions, sd, "embed_action") + time], axis=1)
    x = layer_norm(tokens.reshape(3 * len(t), -1), sd, "embed_ln")
    causal = np.tril(np.ones((len(x), len(x)), dtype=bool))
    for i in range(3):
        b = f"transformer.h.{i}"
        q, k, v = np.split(conv1d(layer_norm(x, sd, f"{b}.ln_1"), sd, f"{b}.attn.c_attn"), 3, -1)
        att = np.where(causal, q @ k.T / np.sqrt(q.shape[-1]), -np.inf)
        att = np.exp(att - att.max(-1, keepdims=True))
        x = x + conv1d((att / att.sum(-1, keepdims=True)) @ v, sd, f"{b}.attn.c_proj")
        h = np.maximum(conv1d(layer_norm(x, sd, f"{b}.ln_2"), sd, f"{b}.mlp.c_fc"), 0)
        x = x + conv1d(h, sd, f"{b}.mlp.c_proj")
    x = layer_norm(x, sd, "transformer.ln_f")
    return np.tanh(linear(x[1::3], sd, "predict_action.0"))


def test_dt_acts_as_the_authors_layout(tmp_path):
    path = convert(DATA / "es_dt_humanoid_1.model", tmp_path / "dt.h5",
                   overrides=["policy.dropout=0.0"])
    policy = Evaluator(read_checkpoint(path)).policy
    rng = np.random.default_rng(0)
    T = 7
    rtg, states = rng.normal(size=T) * 3, rng.normal(size=(T, 376))
    actions, t = np.tanh(rng.normal(size=(T, 17))), np.arange(40, 40 + T)
    want = authors_dt_actions(authors_state("es_dt_humanoid_1.model"), rtg, states, actions, t)
    f32 = lambda a: torch.from_numpy(a[None].astype(np.float32))  # noqa: E731
    with torch.no_grad():
        raw = policy.model(f32(rtg), f32(states), f32(actions), torch.from_numpy(t[None]))
    np.testing.assert_allclose(np.tanh(raw[0].numpy()), want, rtol=1e-4, atol=2e-5)


def test_mlp_acts_as_the_authors_layout(converted):
    sd = authors_state("es_ff_humanoid_1.model")
    obs = np.random.default_rng(1).normal(size=(5, 376))
    x = np.tanh(linear(obs, sd, "hidden_layer1"))
    want = np.tanh(linear(np.tanh(linear(x, sd, "hidden_layer2")), sd, "output_layer"))
    policy = Evaluator(read_checkpoint(converted["es_ff_humanoid_1.model"])).policy
    got = np.stack([policy.act(o.astype(np.float32)) for o in obs])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- named errors
def damaged(tmp_path: Path, edit, name: str = "es_ff_humanoid_1") -> Path:
    """A copy of an ES checkpoint (and its .vbns) with `edit` applied to its state dict."""
    sd = torch.load(DATA / f"{name}.model", weights_only=True)
    edit(sd)
    torch.save(sd, tmp_path / f"{name}.model")
    shutil.copy(DATA / f"{name}.vbns", tmp_path / f"{name}.vbns")
    return tmp_path / f"{name}.model"


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("model.hidden_layer2.bias"),
     "missing key hidden_layer2.bias (for net.2.bias, shape (256,))"),
    (lambda sd: sd.update({"model.output_layer.weight": torch.zeros(17, 255)}),
     "output_layer.weight: shape (17, 255), net.4.weight needs (17, 256)"),
    (lambda sd: sd.update({"model.hidden_layer3.weight": torch.zeros(3)}),
     "unexpected key hidden_layer3.weight (3,)"),
])
def test_a_key_that_does_not_fit_is_named(tmp_path, edit, message):
    model = damaged(tmp_path, edit)
    with pytest.raises(ConfigError, match="does not fit the job's mlp policy") as exc:
        convert(model, tmp_path / "out.h5")
    assert message in str(exc.value)
    assert not (tmp_path / "out.h5").exists()


def test_dt_errors_name_the_key(tmp_path):
    def transposed(sd):
        sd["model.embed_state.weight"] = sd["model.embed_state.weight"].T.contiguous()

    model = damaged(tmp_path, transposed, "es_dt_humanoid_1")
    with pytest.raises(ConfigError, match=r"embed_state.weight: shape \(376, 128\), "
                                          r"model.embed_state.weight needs \(128, 376\)"):
        convert(model, tmp_path / "out.h5")
    with pytest.raises(ConfigError, match=r"causal mask of shape \(1, 1, 60, 60\): a context "
                                          r"of 20 steps, the job's policy.context 10"):
        convert(DATA / "es_dt_humanoid_1.model", tmp_path / "out.h5",
                overrides=["policy.context=10"])
    with pytest.raises(ConfigError, match="holds a dt policy, job .*humanoid_mlp.yaml a 'mlp'"):
        convert(DATA / "humanoid_bc.ckpt", tmp_path / "out.h5",
                job=str(REPO / "jobs/humanoid_mlp.yaml"))
    assert not (tmp_path / "out.h5").exists()


class Payload:
    """A pickled object: torch.load(weights_only=True) refuses to build it."""


def test_unreadable_inputs_are_named(tmp_path):
    model = tmp_path / "a.model"
    shutil.copy(DATA / "es_ff_humanoid_1.model", model)
    with pytest.raises(ConfigError, match=r"needs its observation statistics, .*a.vbns does "
                                          "not exist"):
        convert(model, tmp_path / "out.h5")
    torch.save({"model.w": torch.zeros(2), "code": Payload()}, tmp_path / "b.model")
    with pytest.raises(ConfigError, match="not a torch state dict readable with weights_only"):
        convert(tmp_path / "b.model", tmp_path / "out.h5")
    torch.save({"model.w": torch.zeros(2), "note": "text"}, tmp_path / "b.model")
    with pytest.raises(ConfigError, match=r"state dict of tensors; not tensors: note \(str\)"):
        convert(tmp_path / "b.model", tmp_path / "out.h5")
    (tmp_path / "a.vbns").write_bytes(b"not an npz")
    with pytest.raises(ConfigError, match="a.vbns: not an npz of observation statistics"):
        convert(model, tmp_path / "out.h5")
    np.savez(tmp_path / "zero.npz", mean=np.zeros(376), std=np.zeros(376), count=1.0)
    with pytest.raises(ConfigError, match="zero.npz: .* the std and count .* positive"):
        convert(model, tmp_path / "out.h5", vbns=tmp_path / "zero.npz")
    np.savez(tmp_path / "short.npz", mean=np.zeros(375), std=np.ones(375), count=1.0)
    with pytest.raises(ConfigError, match=r"short.npz: statistics of shape \(375,\), the "
                                          r"environment observes \(376,\)"):
        convert(model, tmp_path / "out.h5", vbns=tmp_path / "short.npz")
    with pytest.raises(ConfigError, match="--vbns: .*humanoid_bc.ckpt is a bare model"):
        convert(DATA / "humanoid_bc.ckpt", tmp_path / "out.h5", vbns=tmp_path / "a.vbns")
    assert not (tmp_path / "out.h5").exists()


def test_a_missing_default_job_asks_for_job(tmp_path, monkeypatch):
    import es_mpi.convert

    monkeypatch.setattr(es_mpi.convert, "JOBS", tmp_path)  # an install without jobs/
    with pytest.raises(ConfigError, match="humanoid_dt_pretrained.yaml is not here .* --job"):
        convert(DATA / "humanoid_bc.ckpt", tmp_path / "out.h5")
    path = convert(DATA / "humanoid_bc.ckpt", tmp_path / "out.h5",
                   job=str(REPO / "jobs/humanoid_dt.yaml"))
    assert loads(load_checkpoint(path)[1]).run.dir == "results/humanoid_dt"


def test_cli_exit_2_with_the_message(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "es_mpi.convert",
                           str(DATA / "es_dt_humanoid_1.model"), "policy.n_embd=64",
                           "--out", str(tmp_path / "out.h5")], cwd=tmp_path, env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("es_mpi: configuration error: ")
    assert "transformer.ln_f.weight: shape (128,), model.transformer.ln_f.weight needs (64,)" \
        in proc.stderr
    assert not (tmp_path / "out.h5").exists()


# ----------------------------------------------------------------------------- run.init_from
@pytest.mark.mpi
@pytest.mark.slow
def test_the_bc_model_starts_the_pretrained_job(converted, tmp_path):
    """jobs/humanoid_dt_pretrained.yaml from the authors' own BC model: the first iteration
    starts from exactly its theta and empty statistics, and a tiny run goes through."""
    from es_mpi.comm import theta_digest

    bc = converted["humanoid_bc.ckpt"]
    pre, _ = load_checkpoint(bc)
    tiny = (f"run.init_from={bc}", "es.population=2", "run.iterations=1",
            "es.noise_table_size=1000000", "env.max_episode_steps=20", "es.eval_episodes=1")
    proc = mpirun(1, [str(REPO / "tests/mpi_scripts/init_state.py"),
                      "jobs/humanoid_dt_pretrained.yaml", f"run.dir={tmp_path / 'probe'}", *tiny],
                  timeout=120, check=True)
    assert (f"rank 0 iteration 0 theta {theta_digest(pre.theta)} obs "
            f"{theta_digest(pre.obs_stats.sum)} count 0.01") in proc.stdout
    run_job(1, tmp_path / "run", *tiny, job="jobs/humanoid_dt_pretrained.yaml")
    final, _ = load_checkpoint(tmp_path / "run" / "checkpoints" / "ckpt_000001.h5")
    assert final.iteration == 1 and not np.array_equal(final.theta, pre.theta)
