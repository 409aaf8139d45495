"""`run.init_from`: start ES from a pretrained policy (es_mpi.pretrain) or any checkpoint.

The file gives theta and the observation statistics; everything else (optimiser state,
iteration count, results) starts afresh. Its policy must be the job's: the same parameter
count, the same observation and action spaces, and the same values of the keys that shape
the model or the meaning of its inputs and outputs (MUST_MATCH); any difference is a
ConfigError naming it, raised before MPI work (runtime.build_training_policy). A resumed run never reads
the file (the checkpoint wins). Never imports MPI.
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from .config import ConfigError, JobConfig, flatten, loads

# Keys whose values shape the model or what its inputs and outputs mean: a file made with
# other values holds another function (dropout, target_return, inference, sampling may differ)
MUST_MATCH = (
    "env.id", "env.normalize_obs", "env.obs_var_floor", "env.obs_clip", "env.frame_skip",
    "env.max_pool_frames", "env.pool_order", "env.screen_size", "env.frame_stack",
    "env.frame_stack_reset", "env.obs_squares",
    "policy.kind", "policy.hidden", "policy.activation", "policy.action_mapping",
    "policy.action_bins",
    "policy.context", "policy.n_embd", "policy.n_layer", "policy.n_head", "policy.inner_mult",
    "policy.max_ep_len", "policy.rtg_scale", "policy.vbn", "policy.frame_scale",
)
# The policy keys of MUST_MATCH that each policy.kind reads (the others do not shape it)
KIND_KEYS = {
    "mlp": ("policy.hidden", "policy.activation", "policy.action_mapping"),
    "cnn": ("policy.vbn", "policy.frame_scale"),
    "dt": ("policy.action_mapping", "policy.context", "policy.n_embd", "policy.n_layer",
           "policy.n_head", "policy.inner_mult", "policy.max_ep_len", "policy.rtg_scale",
           "policy.vbn", "policy.frame_scale"),
}
PRETRAIN_GROUP = "pretrain"  # es_mpi.pretrain's group in its output file


def resolve(path_text: str) -> Path:
    """The file run.init_from names: itself, or the newest valid checkpoint of a run dir."""
    from .checkpoint import latest_valid_checkpoint

    path = Path(path_text)
    if path.is_dir():
        found = latest_valid_checkpoint(path, warn=lambda msg: None)
        if found is None:
            raise ConfigError(f"run.init_from: {path} is a directory without a valid "
                              "checkpoints/ckpt_*.h5")
        return found[2]
    if not path.is_file():
        raise ConfigError(f"run.init_from: no such file {str(path)!r}")
    return path


def _differences(saved_text: str, cfg: JobConfig) -> list[str]:
    try:
        saved = flatten(loads(saved_text).to_dict())
    except ConfigError as exc:
        return [f"its configuration does not load ({exc})"]
    return setting_differences(saved, cfg, "the file", must_match(cfg.policy.kind))


def must_match(kind: str) -> tuple[str, ...]:
    """MUST_MATCH without the policy keys that a `kind` policy does not read (a file of
    another kind differs in policy.kind, which says it all)."""
    other = {k for keys in KIND_KEYS.values() for k in keys} - set(KIND_KEYS.get(kind, ()))
    return tuple(k for k in MUST_MATCH if k not in other)


def setting_differences(recorded: dict, cfg: JobConfig, where: str, keys) -> list[str]:
    """'key: value in WHERE, value in the job' for each of `keys` (flat names) on which a
    recorded configuration differs from the job's."""
    now = flatten(cfg.to_dict())
    return [f"{k}: {recorded.get(k)!r} in {where}, {now.get(k)!r} in the job"
            for k in keys if recorded.get(k) != now.get(k)]


def _space_differences(path: Path, env) -> list[str]:
    """The file's recorded spaces (es_mpi.pretrain writes them) against the job's env."""
    from .demos import space_mismatch, space_summary

    with h5py.File(path, "r") as f:
        attrs = dict(f[PRETRAIN_GROUP].attrs) if PRETRAIN_GROUP in f else {}
    out = []
    for what, space in (("observation", env.observation_space), ("action", env.action_space)):
        key = f"{what}_space"
        if key in attrs:
            msg = space_mismatch(f"its {what}", json.loads(attrs[key]), space_summary(space))
            out += [msg] if msg else []
    return out


def load_initial(cfg: JobConfig, env, policy, guard: bool = False):
    """(theta float32, ObsStats) of run.init_from for `policy` in `env`; ConfigError naming
    the file and every mismatch if it does not fit. `guard`: read a possibly damaged file in
    a child process under a time limit first (es_mpi.h5safe)."""
    from .checkpoint import CheckpointError, load_checkpoint

    path = resolve(cfg.run.init_from)
    try:
        state, config_text = load_checkpoint(path, guard=guard)
    except CheckpointError as exc:
        raise ConfigError(f"run.init_from: {exc}") from None
    problems = _differences(config_text, cfg) + _space_differences(path, env)
    if state.theta.size != policy.num_params:
        problems.append(f"theta has {state.theta.size:,} parameters, the job's policy "
                        f"{policy.num_params:,}")
    shape = tuple(env.observation_space.shape)
    if state.obs_stats.sum.shape != shape:
        problems.append(f"observation statistics of shape {state.obs_stats.sum.shape}, the "
                        f"environment observes {shape}")
    if problems:
        raise ConfigError(f"run.init_from: {path} does not fit this job's policy:\n  "
                          + "\n  ".join(problems))
    return state.theta.astype(np.float32), state.obs_stats


def check_init_from(cfg: JobConfig, env, policy) -> None:
    """The pre-MPI check (every rank): the file loads and fits, unless run.dir already holds
    checkpoints: then the run resumes (or is refused) and run.init_from is not read."""
    from .checkpoint import list_checkpoints

    if cfg.run.init_from is None or list_checkpoints(cfg.run.dir):
        return
    load_initial(cfg, env, policy, guard=True)
