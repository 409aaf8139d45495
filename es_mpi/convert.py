"""`python -m es_mpi.convert MODEL --out FILE.h5`: Lorenc & Neruda's published Humanoid models
as es_mpi checkpoint-format files, which `es_mpi.evaluate` reads and `run.init_from` starts
from.

Two source formats (their `EsModelWrapper.save_parameters` and `supervised_pretraining/`):
  ES checkpoint  `NAME.model`: torch state dict of the wrapper (keys `model.*`), the MLP or
                 the Humanoid DT, with `NAME.vbns` beside it: an npz of the observation mean,
                 std and count they normalise with.
  BC checkpoint  `pretrained_ckpts/humanoid.ckpt`: the bare DT state dict (no prefix),
                 trained on raw observations: identity normalisation (es_mpi's empty
                 statistics, mean 0 and variance 1, as their wrapper's fresh statistics).
The policy kind follows from the keys; the job whose resolved configuration the file records
defaults to jobs/humanoid_mlp.yaml, jobs/humanoid_dt.yaml or jobs/humanoid_dt_pretrained.yaml
(`--job` and `section.key=value` overrides change it). Every parameter of the job's policy must
come from one key of the right shape; the keys es_mpi has no use for are skipped by name
(IGNORED); anything else is a ConfigError naming the key, raised before the output is written.
The files are read with torch.load(weights_only=True): tensors only, no pickled code.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ConfigError, JobConfig
from .es import ObsStats

JOBS = Path(__file__).resolve().parents[1] / "jobs"
# (policy kind, source format) -> the shipped job whose policy the file holds
DEFAULT_JOBS = {("mlp", "es"): "humanoid_mlp.yaml", ("dt", "es"): "humanoid_dt.yaml",
                ("dt", "bc"): "humanoid_dt_pretrained.yaml"}
ES_PREFIX = "model."  # their EsModelWrapper holds the network as `self.model`

# Their MLP (FFModel, float64) -> es_mpi's MLPPolicy.net (Linear, Tanh, Linear, Tanh, Linear)
MLP_LAYERS = {"hidden_layer1": "net.0", "hidden_layer2": "net.2", "output_layer": "net.4"}
# Their DT is Chen et al.'s GPT-2 copy: Hugging Face Conv1D layers store (in, out) weights,
# torch Linear (out, in); these are transposed
CONV1D = re.compile(r"^transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)"
                    r"\.weight$")
# Keys of their DT with no counterpart in es_mpi's, skipped: GPT-2's 1-row token table (never
# read: the DT feeds embeddings), and each block's attention buffers, the causal mask (checked
# against policy.context, `check_causal_mask`) and the -1e4 fill value of masked scores
IGNORED = (re.compile(r"^transformer\.wte\.weight$"),
           re.compile(r"^transformer\.h\.\d+\.attn\.bias$"),
           re.compile(r"^transformer\.h\.\d+\.attn\.masked_bias$"))


@dataclass
class Source:
    """An authors' checkpoint as read: the network's state dict and its normalisation."""

    path: Path
    kind: str  # "mlp" or "dt"
    fmt: str  # "es" (with .vbns statistics) or "bc" (raw observations)
    state: dict  # key (without the wrapper's `model.` prefix) -> numpy array
    vbns: Path | None
    stats: dict | None  # mean, std (float32 arrays), count (float) from the .vbns


def load_state_dict(path: Path) -> dict:
    """The tensors of a torch state dict, as numpy arrays; ConfigError if it is not one."""
    import torch

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, or it holds more than tensors
        raise ConfigError(f"{path}: not a torch state dict readable with weights_only=True "
                          f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]})"
                          ) from None
    if not isinstance(sd, dict):
        raise ConfigError(f"{path}: expected a state dict of tensors, got {type(sd).__name__}")
    odd = [f"{k} ({type(v).__name__})" for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise ConfigError(f"{path}: expected a state dict of tensors; not tensors: "
                          f"{', '.join(odd)}")
    return {str(k): v.detach().numpy() for k, v in sd.items()}


def load_vbns(path: Path) -> dict:
    """Their observation statistics (npz of mean, std, count); ConfigError if unreadable."""
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("mean", "std", "count") if k not in data.files]
            if missing:
                raise ConfigError(f"{path}: no {', '.join(missing)} in the statistics file "
                                  f"(it holds {', '.join(data.files) or 'nothing'})")
            stats = {"mean": data["mean"], "std": data["std"], "count": float(data["count"])}
    except (OSError, ValueError, TypeError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{path}: not an npz of observation statistics ({exc})") from None
    mean, std, count = stats["mean"], stats["std"], stats["count"]
    if mean.shape != std.shape or not (count > 0 and np.all(std > 0)
                                       and np.all(np.isfinite(mean))):
        raise ConfigError(f"{path}: mean {mean.shape} and std {std.shape} must have one shape, "
                          f"the mean be finite, the std and count ({count}) positive")
    return stats


def policy_kind(path: Path, keys) -> str:
    if "hidden_layer1.weight" in keys:
        return "mlp"
    if "transformer.ln_f.weight" in keys:
        return "dt"
    raise ConfigError(f"{path}: neither the authors' MLP (hidden_layer1.weight) nor their "
                      f"Decision Transformer (transformer.ln_f.weight): keys "
                      f"{', '.join(sorted(keys)[:6])}...")


def read_source(path: str | Path, vbns: str | Path | None = None) -> Source:
    """An ES checkpoint (keys `model.*`, statistics from `vbns`, default NAME.vbns beside it)
    or a BC checkpoint (bare keys; no statistics file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no such file {str(path)!r}")
    raw = load_state_dict(path)
    if raw and all(k.startswith(ES_PREFIX) for k in raw):
        state, fmt = {k[len(ES_PREFIX):]: v for k, v in raw.items()}, "es"
        vbns = Path(vbns) if vbns is not None else path.with_suffix(".vbns")
        if not vbns.is_file():
            raise ConfigError(f"{path}: an ES checkpoint needs its observation statistics, "
                              f"{vbns} does not exist (--vbns names another file)")
        stats = load_vbns(vbns)
    else:
        if vbns is not None:
            raise ConfigError(f"--vbns: {path} is a bare model (behaviour cloning on raw "
                              "observations), it has no statistics file")
        state, fmt, stats = raw, "bc", None
    return Source(path, policy_kind(path, state), fmt, state, vbns if stats else None, stats)


# ----------------------------------------------------------------------------- the mapping
def source_key(kind: str, name: str) -> str:
    """The authors' key holding es_mpi's parameter `name`."""
    if kind == "mlp":
        layer, _, leaf = name.rpartition(".")
        inverse = {v: k for k, v in MLP_LAYERS.items()}
        return f"{inverse.get(layer, layer)}.{leaf}"
    key = name.removeprefix("model.")
    return key.replace("predict_action.", "predict_action.0.")  # their Sequential(Linear, Tanh)


def is_ignored(key: str) -> bool:
    return any(p.match(key) for p in IGNORED)


def check_causal_mask(src: Source, context: int) -> None:
    """Their blocks' mask buffers are tril(3K x 3K): K must be the job's policy.context."""
    n = 3 * context
    for key, value in src.state.items():
        if key.endswith(".attn.bias") and value.shape != (1, 1, n, n):
            raise ConfigError(f"{src.path}: {key} is a causal mask of shape {value.shape}: a "
                              f"context of {value.shape[-1] // 3} steps, the job's "
                              f"policy.context {context} needs (1, 1, {n}, {n})")


def map_parameters(src: Source, policy) -> list[str]:
    """Copy every parameter of `policy` from its key in `src` (transposing Conv1D weights);
    returns the keys skipped (IGNORED). ConfigError naming a missing key, a shape mismatch
    or a key that is neither used nor ignored."""
    used, problems = set(), []
    for name, param in policy.named_parameters():
        key = source_key(src.kind, name)
        if key not in src.state:
            problems.append(f"missing key {key} (for {name}, shape {tuple(param.shape)})")
            continue
        value = src.state[key].T if src.kind == "dt" and CONV1D.match(key) else src.state[key]
        if value.shape != tuple(param.shape):
            problems.append(f"{key}: shape {src.state[key].shape}, {name} needs "
                            f"{tuple(param.shape)}")
            continue
        param.data.copy_(_tensor(value))  # a view of the flat theta
        used.add(key)
    ignored = sorted(k for k in src.state if k not in used and is_ignored(k))
    problems += [f"unexpected key {k} {src.state[k].shape}" for k in sorted(src.state)
                 if k not in used and k not in ignored]
    if problems:
        raise ConfigError(f"{src.path} does not fit the job's {src.kind} policy:\n  "
                          + "\n  ".join(problems))
    return ignored


def _tensor(value: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))


def obs_stats_of(src: Source, obs_shape: tuple) -> ObsStats:
    """es_mpi's running sums that give their mean and std (their VirtualBatchNormalization
    `set`: sum = mean·n, sumsq = (mean² + std²)·n); empty statistics for a BC model."""
    if src.stats is None:
        return ObsStats.empty(obs_shape)
    mean = src.stats["mean"].astype(np.float64)
    std = src.stats["std"].astype(np.float64)
    if mean.shape != obs_shape:
        raise ConfigError(f"{src.vbns}: statistics of shape {mean.shape}, the environment "
                          f"observes {obs_shape}")
    n = src.stats["count"]
    return ObsStats(mean * n, (mean**2 + std**2) * n, n)


# ----------------------------------------------------------------------------- the job
def job_config(src: Source, job: str | None, overrides: list[str]) -> JobConfig:
    """The job the file belongs to (its policy kind must be the file's), run.init_from
    cleared: the file is a starting point, not a run that had one."""
    from .config import load_job

    path = Path(job) if job else JOBS / DEFAULT_JOBS[(src.kind, src.fmt)]
    if not job and not path.is_file():
        raise ConfigError(f"the default job {path} is not here (es_mpi installed without its "
                          "jobs/ folder): name the job with --job")
    cfg = load_job(path, overrides)
    if cfg.policy.kind != src.kind:
        raise ConfigError(f"{src.path} holds a {src.kind} policy, job {path} a "
                          f"{cfg.policy.kind!r} one")
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, init_from=None))


def build(src: Source, cfg: JobConfig) -> tuple[object, ObsStats, list[str]]:
    """(policy with the file's weights, ObsStats, ignored keys) in the job's environment."""
    from .envs import make_env
    from .runtime import build_policy

    env = make_env(cfg.env)
    try:
        if src.kind == "dt":
            check_causal_mask(src, cfg.policy.context)
        policy = build_policy(cfg, env)
        ignored = map_parameters(src, policy)
        stats = obs_stats_of(src, tuple(env.observation_space.shape))
    finally:
        env.close()
    return policy, stats, ignored


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_converted(out: Path, src: Source, cfg: JobConfig, policy, stats,
                    ignored: list[str]) -> Path:
    """A checkpoint-format file of iteration 0 (fresh optimiser, no results rows) with a
    `convert/` group naming the source files (docs/results-format.md)."""
    from .checkpoint import TrainState, save_checkpoint
    from .es import OptimizerState
    from .results import COLUMNS

    theta = policy.get_theta()
    state = TrainState(0, theta, OptimizerState.zeros(theta.size), stats,
                       prev_lengths=np.zeros(0, dtype=np.int64),
                       results={k: np.zeros(0, dtype=d) for k, (d, _, _) in COLUMNS.items()})
    attrs = {"source": str(src.path), "source_sha256": file_digest(src.path),
             "source_format": src.fmt, "vbns": str(src.vbns or ""),
             "vbns_sha256": file_digest(src.vbns) if src.vbns else "",
             "obs_count": float(src.stats["count"]) if src.stats else 0.0,
             "ignored_keys": json.dumps(ignored)}
    rng = {"scheme": "none: theta converted from the authors' checkpoint",
           "run_seed": np.int64(cfg.run.seed)}
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(out, state, cfg.to_yaml(), rng, extra_group=("convert", {}, attrs))


def convert(model: str | Path, out: str | Path, job: str | None = None,
            overrides: list[str] = (), vbns: str | Path | None = None) -> Path:
    """Read, map, check, then write `out`: nothing is written unless everything fits."""
    from .outputs import check_writable

    out = check_writable("--out", out)
    src = read_source(model, vbns)
    cfg = job_config(src, job, list(overrides))
    policy, stats, ignored = build(src, cfg)
    return write_converted(out, src, cfg, policy, stats, ignored)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m es_mpi.convert",
                                description=" ".join(__doc__.splitlines()[:3]))
    p.add_argument("model", help="the authors' .model (ES, .vbns beside it) or .ckpt (BC)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the job")
    p.add_argument("--out", required=True, help="output .h5 (for evaluate / run.init_from)")
    p.add_argument("--job", help="job YAML the policy belongs to (default: the shipped "
                                 "humanoid_mlp / humanoid_dt / humanoid_dt_pretrained job)")
    p.add_argument("--vbns", help="observation statistics of an ES checkpoint "
                                  "(default: MODEL with the suffix .vbns)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from .launch import run_tool

    return run_tool(convert_command, parse_args(argv))


def convert_command(args) -> int:
    path = convert(args.model, args.out, args.job, args.overrides, args.vbns)
    from .checkpoint import load_checkpoint
    from .config import loads

    state, text = load_checkpoint(path)
    cfg = loads(text)
    print(f"es_mpi.convert: {args.model} -> {path}: {cfg.env.id}, policy {cfg.policy.kind} "
          f"with {state.theta.size:,} parameters, observation count "
          f"{state.obs_stats.count:,.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
