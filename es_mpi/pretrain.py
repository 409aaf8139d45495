"""`python -m es_mpi.pretrain JOB.yaml --data DATASET --steps N --out FILE.h5`: behaviour
cloning of the job's policy on a Minari dataset, for ES fine-tuning with run.init_from.

Decision Transformers train as Chen et al. 2021 do: random K-step windows of the dataset's
episodes with their returns-to-go (scaled by policy.rtg_scale), the dataset's actions as the
action tokens, MSE between the mapped action output and the action for Box actions,
cross-entropy for Discrete ones, AdamW with a linear warm-up. MLP and CNN policies regress
the action on the observation. The defaults per policy family are the references' settings
(FAMILIES; `--set key=value` changes one). Observations are normalised with the dataset's
statistics (`--obs-stats dataset`), which the output file carries: ES fine-tuning and
es_mpi.evaluate then normalise the same way (`--obs-stats none`: unnormalised, Lorenc &
Neruda's pretraining). The output is a checkpoint-format HDF5 file (theta, observation
statistics, the job's config) plus a `pretrain/` group: loss curve, held-out loss,
evaluation returns, the dataset's spaces. One process; torch uses --threads threads.
"""
from __future__ import annotations

from .determinism import pin_cpu_kernels

pin_cpu_kernels()  # the kernels ES fine-tuning and evaluate will use

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Literal  # noqa: E402

import numpy as np  # noqa: E402

from .config import ConfigError, JobConfig, parse_action_bins  # noqa: E402


@dataclass(frozen=True)
class BCSettings:
    """Behaviour-cloning hyperparameters (defaults per policy family: FAMILIES)."""

    batch_size: int  # windows (DT) or steps (MLP/CNN) per gradient step
    lr: float  # AdamW peak learning rate
    weight_decay: float  # AdamW decoupled weight decay
    decay_matrices_only: bool  # decay only Linear/Conv weights (mingpt), else every parameter
    beta1: float  # AdamW betas
    beta2: float
    warmup_steps: int  # linear warm-up of the learning rate over this many steps
    cosine_steps: int  # after warm-up: cosine decay to 10% over this many steps; 0 = constant
    grad_clip: float  # clip the gradient's global L2 norm to this
    full_windows: bool  # DT: windows lie inside an episode (Chen's Atari) or may run past its end
    window_time: Literal["first", "last"]  # image DT: global position = first or last timestep
    # DT: sample = each window's start drawn uniformly from all steps (Chen et al.); epochs =
    # every full K-window of every episode once per pass, shuffled (Lorenc & Neruda)
    windows: Literal["sample", "epochs"] = "sample"
    dropout: float | None = None  # DT dropout while cloning; None = the job's policy.dropout
    input_divisor: float = 1.0  # cloning inputs divided by this (Lorenc's Hero: frames / 255)
    terminal_reward: Literal["keep", "zero"] = "keep"  # zero: a terminated episode's last
    #                                                   reward is 0 in the returns-to-go (Lorenc)


# policy family -> the reference's settings
FAMILIES: dict[str, BCSettings] = {
    # Lorenc's supervised_pretraining/train_mujoco.py (Chen et al.'s gym trainer): AdamW 1e-4,
    # weight decay 1e-4 on all parameters, warm-up 10,000 steps, batch 128, clip 0.25
    "dt": BCSettings(128, 1e-4, 1e-4, False, 0.9, 0.999, 10_000, 0, 0.25, False, "last"),
    # Lorenc's train_atari.py / trainer_atari.py (Chen et al.'s mingpt trainer): AdamW 6e-4,
    # betas (0.9, 0.95), decay 0.1 on matrices, warm-up 512,000 tokens = 133 steps of 128x30
    # actions, cosine to 10% at 2*5e5*128*30*3 tokens = 3,000,000 steps, clip 1.0
    "dt_atari": BCSettings(128, 6e-4, 0.1, True, 0.9, 0.95, 133, 3_000_000, 1.0, True, "first"),
    # no reference: plain regression of the action on the observation
    "feedforward": BCSettings(256, 1e-3, 1e-4, False, 0.9, 0.999, 100, 0, 1.0, False, "last"),
}


# policy family -> the --set changes of `--recipe authors`: Lorenc & Neruda's pretraining code
# (supervised_pretraining/, docs/fidelity.md "Pretraining"); with it --obs-stats defaults to none
AUTHORS_RECIPE: dict[str, list[str]] = {
    # train_mujoco.py, create_dataset.py, get_data.py: dropout 0.1, every window once, the
    # reward of a terminated step replaced by 0
    "dt": ["windows=epochs", "dropout=0.1", "terminal_reward=zero"],
    # train_atari.py (mingpt's GPTConfig: dropout 0.1), create_dataset.py, get_data.py (state / 255)
    "dt_atari": ["windows=epochs", "dropout=0.1", "input_divisor=255"],
}
NULLABLE = {"dropout"}  # settings that take null


def recipe_settings(family: str, recipe: str, items: list[str]) -> BCSettings:
    """The family's settings, then the recipe's changes, then `--set` items (ConfigError if
    the recipe has nothing for this family: the authors pretrained Decision Transformers only)."""
    changes = []
    if recipe == "authors":
        if family not in AUTHORS_RECIPE:
            raise ConfigError(f"--recipe authors: Lorenc & Neruda pretrain Decision Transformers "
                              f"only; this job's policy is of the {family!r} family")
        changes = AUTHORS_RECIPE[family]
    return override_settings(FAMILIES[family], [*changes, *items])


def family_of(policy) -> str:
    from .policies.dt import DTPolicy

    if isinstance(policy, DTPolicy):
        return "dt" if policy.model.position_free else "dt_atari"
    return "feedforward"


def override_settings(settings: BCSettings, items: list[str]) -> BCSettings:
    """`--set key=value` (YAML values) on top of a family's defaults; ConfigError if bad."""
    from .config import load_yaml

    names = {f.name: f for f in dataclasses.fields(BCSettings)}
    changes = {}
    for item in items:
        key, _, raw = item.partition("=")
        if key not in names:
            raise ConfigError(f"--set: unknown setting {key!r}; settings: {', '.join(names)}")
        value = load_yaml(raw)  # numbers in every spelling: 1e-3, .5, 1E3
        if key in NULLABLE and value is None:
            changes[key] = None
            continue
        want = float if key in NULLABLE else type(getattr(settings, key))
        if want is float and not isinstance(value, bool):
            try:  # YAML reads 1e-3 as a string, 3 as an int
                value = float(value)
            except (TypeError, ValueError):
                pass
        if not isinstance(value, want):
            raise ConfigError(f"--set {key}: expected {want.__name__}, got {raw!r}")
        if want is float and not math.isfinite(value):
            raise ConfigError(f"--set {key}: must be a finite number, got {raw!r}")
        check_setting(key, value)
        changes[key] = value
    return dataclasses.replace(settings, **changes)


# range checks beyond the type: setting -> (predicate, what is allowed)
SETTING_RULES = {"dropout": (lambda v: 0 <= v < 1, "a number in [0, 1) or null"),
                 "input_divisor": (lambda v: v > 0, "a positive number")}


def check_setting(key: str, value) -> None:
    """ConfigError if `value` is not one of a Literal setting's choices or out of range."""
    import typing

    choices = typing.get_args(typing.get_type_hints(BCSettings)[key])
    if typing.get_origin(typing.get_type_hints(BCSettings)[key]) is Literal \
            and value not in choices:
        raise ConfigError(f"--set {key}: must be one of {', '.join(choices)}, got {value!r}")
    ok, allowed = SETTING_RULES.get(key, (lambda v: True, ""))
    if not ok(value):
        raise ConfigError(f"--set {key}: must be {allowed}, got {value!r}")


# ----------------------------------------------------------------------------- data
@dataclass
class Corpus:
    """A dataset ready for batching: episodes split into training and held-out ones."""

    obs: np.ndarray  # (S, *obs) raw observations
    actions: np.ndarray  # (S, *act) float32 or (S,) int64
    rtg: np.ndarray  # (S,) float32 returns-to-go times policy.rtg_scale
    timesteps: np.ndarray  # (S,) int64 step within its episode
    train: tuple[np.ndarray, np.ndarray]  # (starts, lengths) of the training episodes
    heldout: tuple[np.ndarray, np.ndarray]  # (starts, lengths) of the held-out episodes
    normalize: Callable[[np.ndarray], np.ndarray]  # raw -> policy input (float32)


def make_corpus(demos, cfg: JobConfig, normalize, heldout_fraction: float,
                terminal_reward: str = "keep") -> Corpus:
    """Steps of every episode; the last round(fraction * E) episodes (at least one when
    there are two or more) are held out. terminal_reward "zero": returns-to-go as if each
    terminated episode's last reward were 0 (Lorenc's Humanoid data generator)."""
    n_held = 0 if demos.episodes < 2 else max(1, round(heldout_fraction * demos.episodes))
    cut = demos.episodes - n_held
    timesteps = np.arange(demos.steps) - np.repeat(demos.starts, demos.lengths)
    if terminal_reward == "zero":
        demos = dataclasses.replace(demos, rewards=zero_terminal_rewards(demos))
    rtg = (demos.returns_to_go() * cfg.policy.rtg_scale).astype(np.float32)
    return Corpus(demos.observations, demos.actions, rtg, timesteps.astype(np.int64),
                  (demos.starts[:cut], demos.lengths[:cut]),
                  (demos.starts[cut:], demos.lengths[cut:]), normalize)


def zero_terminal_rewards(demos) -> np.ndarray:
    """The rewards with the last step of every terminated episode (not one cut short by a
    time limit or the collector's cap) set to 0; ConfigError if the dataset cannot tell."""
    if demos.terminated is None:
        raise ConfigError(f"--set terminal_reward=zero: {demos.source} does not record which "
                          "episodes terminated")
    rewards = demos.rewards.copy()
    rewards[(demos.starts + demos.lengths - 1)[demos.terminated]] = 0.0
    return rewards


def full_windows(episodes: tuple, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(first row (W,), real steps (W,)) of every full k-window of every episode, in order;
    an episode shorter than k gives one window of all its steps (masked after them: the
    authors' left zero-padding, for a DT whose tokens do not depend on the window start)."""
    starts, lengths = (np.asarray(a, dtype=np.int64) for a in episodes)
    counts = np.maximum(lengths - k + 1, 1)
    first_of_ep = np.repeat(np.cumsum(counts) - counts, counts)
    first = np.repeat(starts, counts) + np.arange(counts.sum()) - first_of_ep
    return first, np.repeat(np.minimum(lengths, k), counts)


def epoch_windows(seed: int, episodes: tuple, batch: int, k: int, first_batch: int = 0):
    """Batches (rows (B, k), mask (B, k)) of the windows of `full_windows`, each window once
    per epoch; epoch e in the order of a permutation drawn from (seed, e) alone, so batch i
    is a function of i (a resumed pretraining continues the same epoch). A batch may span two
    epochs. Starts at batch `first_batch`."""
    first, n = full_windows(episodes, k)
    pos, cached = np.arange(k)[None, :], {}

    def order(epoch: int) -> np.ndarray:
        if epoch not in cached:
            cached.clear()
            cached[epoch] = np.random.default_rng([seed, 0xE90C, epoch]).permutation(len(first))
        return cached[epoch]

    at = first_batch * batch
    while True:
        idx = np.arange(at, at + batch)
        take = np.concatenate([order(int(e))[idx[idx // len(first) == e] % len(first)]
                               for e in np.unique(idx // len(first))])
        at += batch
        yield first[take, None] + np.minimum(pos, n[take, None] - 1), pos < n[take, None]


def batch_source(rng: np.random.Generator, corpus: Corpus, settings: BCSettings, policy,
                 dt: bool, seed: int, first_batch: int) -> Callable[[], tuple]:
    """() -> the next training batch: sampled windows (draw_batch, from `rng`), or epochs of
    every window (from `seed` and the batch index, starting at `first_batch`)."""
    if dt and settings.windows == "epochs":
        batches = epoch_windows(seed, corpus.train, settings.batch_size, policy.context,
                                first_batch)
        return lambda: next(batches)
    return lambda: draw_batch(rng, corpus, corpus.train, settings, policy, dt)


def sample_windows(rng: np.random.Generator, episodes: tuple, batch: int, k: int,
                   full: bool) -> tuple[np.ndarray, np.ndarray]:
    """(rows (B, k), mask (B, k)): windows of k steps, each starting at a step drawn
    uniformly from all steps (Chen et al.: an episode with probability proportional to its
    length, then a uniform start in it). `full`: a start too close to the end moves back so
    the window fits (Chen's Atari). A window cut by its episode's end repeats its last row,
    masked: behind every real token, so causal attention never sees it."""
    starts, lengths = episodes
    ep = rng.choice(len(starts), size=batch, p=lengths / lengths.sum())
    off = np.floor(rng.random(batch) * lengths[ep]).astype(np.int64)
    if full:
        off = np.maximum(np.minimum(off, lengths[ep] - k), 0)
    n = np.minimum(k, lengths[ep] - off)
    pos = np.arange(k)[None, :]
    return starts[ep, None] + off[:, None] + np.minimum(pos, n[:, None] - 1), pos < n[:, None]


STATS_ROWS = 1024  # observations per chunk of the integer statistics


def dataset_stats(demos, normalized: bool, squares: str = "exact"):
    """The observation statistics the policy will normalise with: the dataset's (every step,
    on top of es_mpi's pseudo-count; its squares as env.obs_squares makes them), or none
    (mean 0, std 1: raw inputs)."""
    from .es import ObsStats
    from .rollout import obs_squares

    shape = demos.observations.shape[1:]
    stats = ObsStats.empty(shape)
    if not normalized:
        return stats
    obs = demos.observations
    if np.issubdtype(obs.dtype, np.integer):  # frames: exact in int64, in chunks of rows so
        total = np.zeros(shape, np.int64)      # the squares never take 8x the dataset
        total_sq = np.zeros(shape, np.int64)
        for lo in range(0, len(obs), STATS_ROWS):
            part = obs[lo:lo + STATS_ROWS]
            total += part.sum(axis=0, dtype=np.int64)
            total_sq += obs_squares(part, np.int64, squares).sum(axis=0)
    else:
        total = obs.sum(axis=0, dtype=np.float64)
        total_sq = obs_squares(obs, np.float64, squares).sum(axis=0)
    stats.add(total.astype(np.float64), total_sq.astype(np.float64), float(demos.steps))
    return stats


# ----------------------------------------------------------------------------- the loss
def _input(x: np.ndarray):
    """Policy input: uint8 frames as they are (image encoders scale them), else float32."""
    import torch

    return torch.from_numpy(x if x.dtype == np.uint8 else np.ascontiguousarray(x, np.float32))


def draw_batch(rng, corpus: Corpus, episodes: tuple, settings: BCSettings, policy, dt: bool):
    """(rows, mask): windows of policy.context steps for a DT, single steps otherwise."""
    return sample_windows(rng, episodes, settings.batch_size, policy.context if dt else 1,
                          dt and settings.full_windows)


def forward(policy, corpus: Corpus, rows: np.ndarray, settings: BCSettings, dt: bool,
            generator):
    """Raw action outputs (B, k, act) at the rows: the DT's full-sequence forward (returns,
    states, actions, timesteps; dropout masks from `generator`), or the MLP/CNN per step."""
    import torch

    states = corpus.normalize(corpus.obs[rows])
    if settings.input_divisor != 1.0:  # after the statistics, as Lorenc's Hero frames / 255
        states = np.asarray(states, dtype=np.float32) / np.float32(settings.input_divisor)
    states = _input(states)
    if not dt:
        return policy(states.reshape(-1, *states.shape[2:]))[:, None]
    t = corpus.timesteps[rows]
    if settings.window_time == "first":  # the image DT reads the global position at t[:, -1]
        t = np.repeat(t[:, :1], t.shape[1], axis=1)
    return policy.model(torch.from_numpy(corpus.rtg[rows]), states,
                        torch.from_numpy(corpus.actions[rows]), torch.from_numpy(t),
                        generator=generator)


def action_loss(policy, raw, target: np.ndarray, mask: np.ndarray):
    """Mean over the real positions: MSE between the mapped Box action (the ActionHead's
    tanh / bounds / linear, differentiable) and the target, or cross-entropy of the logits."""
    import torch
    import torch.nn.functional as F

    m = torch.from_numpy(mask.astype(np.float32)).reshape(-1)
    if policy.head.discrete:
        ce = F.cross_entropy(raw.reshape(-1, raw.shape[-1]), torch.from_numpy(target).reshape(-1),
                             reduction="none")
        return (ce * m).sum() / m.sum()
    pred = policy.head.continuous(raw).reshape(m.shape[0], -1)
    err = (pred - torch.from_numpy(target).reshape(m.shape[0], -1)).square().mean(-1)
    return (err * m).sum() / m.sum()


def batch_loss(policy, corpus, batch, settings, dt, generator):
    rows, mask = batch
    raw = forward(policy, corpus, rows, settings, dt, generator)
    return action_loss(policy, raw, corpus.actions[rows], mask)


# ----------------------------------------------------------------------------- optimiser
def make_optimizer(policy, settings: BCSettings):
    """AdamW; with decay_matrices_only the weights of Linear and Conv layers decay and
    biases, norms, embeddings and position tables do not (mingpt's configure_optimizers)."""
    import torch
    from torch import nn

    decay, rest = [], []
    for module in policy.modules():
        for name, p in module.named_parameters(recurse=False):
            matrix = name == "weight" and isinstance(module, (nn.Linear, nn.Conv2d))
            (decay if matrix or not settings.decay_matrices_only else rest).append(p)
    groups = [{"params": decay, "weight_decay": settings.weight_decay},
              {"params": rest, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=settings.lr, betas=(settings.beta1, settings.beta2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, settings))
    return opt, sched


def lr_factor(step: int, settings: BCSettings) -> float:
    """Linear warm-up to 1 (the references' (step+1)/warmup), then constant or a cosine
    decay to 0.1 over cosine_steps."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    if settings.cosine_steps <= 0:
        return 1.0
    progress = (step - settings.warmup_steps) / settings.cosine_steps
    return max(0.1, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


# ----------------------------------------------------------------------------- training
@dataclass
class Curve:
    """What the run measured; written to the output's `pretrain/` group."""

    step: list = field(default_factory=list)  # last step of each logged interval
    loss: list = field(default_factory=list)  # mean training loss over the interval
    eval_step: list = field(default_factory=list)  # steps done at each evaluation
    heldout_loss: list = field(default_factory=list)  # loss on the held-out episodes
    eval_return: list = field(default_factory=list)  # mean return of the policy (NaN: none)
    train_seconds: float = 0.0  # time in gradient steps (evaluations excluded)


@dataclass
class Job:
    """Everything one pretraining run needs, built once (`setup`)."""

    cfg: JobConfig
    env: object
    policy: object
    corpus: Corpus
    stats: object  # es.ObsStats the policy normalises with
    settings: BCSettings
    dt: bool  # a Decision Transformer (windows) or an MLP/CNN (single steps)
    demos: object  # demos.Demos


def heldout_loss(job: Job, batches: list, seed: int) -> float:
    import torch

    if not batches:
        return float("nan")
    gen = torch.Generator().manual_seed(seed)  # the same dropout masks at every evaluation
    with torch.no_grad(), dropout_rate(job.policy, job.settings.dropout):  # as in training
        return float(np.mean([batch_loss(job.policy, job.corpus, b, job.settings, job.dt, gen)
                              .item() for b in batches]))


def evaluate(job: Job, episodes: int, seed: int, max_steps: int | None) -> float:
    """Mean return over `episodes` episodes, as es_mpi.evaluate --seed SEED runs them."""
    from .envs import episode_limit
    from .evaluate import run_episodes

    if episodes == 0:
        return float("nan")
    res = run_episodes(job.env, job.policy, job.corpus.normalize, episode_limit(job.env),
                       episodes, seed, max_steps=max_steps)
    return float(np.mean([r.ret for r in res]))


def train(job: Job, args, partial: dict | None = None) -> Curve:
    """args.steps AdamW steps; every --eval-every steps the held-out loss and an evaluation,
    every --checkpoint-every steps the whole training state to partial_path(--out). From
    `partial` (read_partial) it continues exactly where that run stopped."""
    import torch

    from .progress import progress

    rng = np.random.default_rng([args.seed, 0xBC])
    gen = torch.Generator().manual_seed(args.seed)
    held = heldout_batches(job, args)
    opt, sched = make_optimizer(job.policy, job.settings)
    loop = TrainLoop(Curve(), 0, []) if partial is None else \
        restore_partial(partial, job, opt, sched, rng, gen)
    curve, log_every = loop.curve, max(1, args.steps // 200)
    next_batch = batch_source(rng, job.corpus, job.settings, job.policy, job.dt, args.seed,
                              loop.done)
    bar = progress(args.steps, "pretrain", "steps", initial=loop.done)
    while loop.done < args.steps:
        chunk = next_stop(loop.done, args) - loop.done
        t0 = time.perf_counter()
        with job.policy.trainable():
            for _ in range(chunk):
                batch = next_batch()
                loop.window.append(gradient_step(job, batch, gen, opt, sched))
                loop.done += 1
                if loop.done % log_every == 0 or loop.done == args.steps:
                    curve.step.append(loop.done)
                    curve.loss.append(float(np.mean(loop.window)))
                    bar.set_postfix(loss=f"{curve.loss[-1]:.4g}", refresh=False)
                    loop.window = []
                bar.update(1)
        curve.train_seconds += time.perf_counter() - t0
        if loop.done % args.eval_every == 0 or loop.done == args.steps:
            evaluate_now(job, args, held, curve, loop.done, bar)
        if args.checkpoint_every and loop.done % args.checkpoint_every == 0 \
                and loop.done < args.steps:
            write_partial(partial_path(args.out), job, args, loop, opt, sched, rng, gen)
    bar.close()
    return curve


@contextlib.contextmanager
def dropout_rate(policy, p: float | None):
    """The DT's dropout probability set to `p` inside the block (None: left as the job's);
    ES and evaluation afterwards run with the job's policy.dropout again."""
    from .policies.dt import GPT, MLP, CausalSelfAttention

    mods = [m for m in policy.modules() if isinstance(m, (MLP, CausalSelfAttention))]
    gpts = [m for m in policy.modules() if isinstance(m, GPT)]
    if p is None or not gpts:
        yield
        return
    saved = [m.p for m in mods], [g.cfg.dropout for g in gpts]
    try:
        for m in mods:
            m.p = p
        for g in gpts:
            g.cfg.dropout = p
        yield
    finally:
        for m, old in zip(mods, saved[0]):
            m.p = old
        for g, old in zip(gpts, saved[1]):
            g.cfg.dropout = old


def heldout_batches(job: Job, args) -> list:
    """The fixed batches of held-out windows (none without held-out episodes)."""
    if not len(job.corpus.heldout[0]):
        return []
    return [draw_batch(np.random.default_rng([args.seed, 0x4E1D, i]), job.corpus,
                       job.corpus.heldout, job.settings, job.policy, job.dt)
            for i in range(args.heldout_batches)]


def evaluate_now(job: Job, args, held: list, curve: Curve, done: int, bar) -> None:
    """The held-out loss and the mean evaluation return, recorded and shown (only what
    is measured: no held-out episodes or --eval-episodes 0 show nothing)."""
    curve.eval_step.append(done)
    curve.heldout_loss.append(heldout_loss(job, held, args.seed))
    curve.eval_return.append(evaluate(job, args.eval_episodes, args.eval_seed,
                                      args.eval_max_steps))
    shown = {"loss": f"{curve.loss[-1]:.4g}"}
    if held:
        shown["heldout"] = f"{curve.heldout_loss[-1]:.4g}"
    if args.eval_episodes:
        shown["eval"] = f"{curve.eval_return[-1]:.1f}"
    bar.set_postfix(**shown)


def next_stop(done: int, args) -> int:
    """The next step after `done` at which to evaluate or checkpoint (or the last step)."""
    stops = [args.steps, (done // args.eval_every + 1) * args.eval_every]
    if args.checkpoint_every:
        stops.append((done // args.checkpoint_every + 1) * args.checkpoint_every)
    return min(stops)


def gradient_step(job: Job, batch, gen, opt, sched) -> float:
    import torch

    with dropout_rate(job.policy, job.settings.dropout):
        loss = batch_loss(job.policy, job.corpus, batch, job.settings, job.dt, gen)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(job.policy.parameters(), job.settings.grad_clip)
    opt.step()
    sched.step()
    return float(loss.item())


# ----------------------------------------------------------------------------- interruptions
CHECKPOINT_EVERY = 1000  # default steps between partial checkpoints
# options that do not change the numbers: a rerun may change them and still continue
NOT_FINGERPRINTED = ("out", "data", "checkpoint_every")  # data: by its absolute path below


@dataclass
class TrainLoop:
    """Where training stands: the state not held by the policy, optimiser and generators."""

    curve: Curve
    done: int  # gradient steps taken
    window: list  # losses since the last logged step


def partial_path(out: str | Path) -> Path:
    """Where a pretraining writes its periodic checkpoints: OUT.partial.h5 next to --out
    (e.g. pretrained/dt.h5.partial.h5)."""
    out = Path(out).absolute()
    return out.with_name(out.name + ".partial.h5")


def fingerprint(job: Job, args) -> str:
    """The command as it determines the numbers: options (--threads too: torch's sums depend
    on the thread count), resolved job, the dataset (a folder by its absolute path, else its
    Minari id) and its size."""
    options = {k: v for k, v in sorted(vars(args).items()) if k not in NOT_FINGERPRINTED}
    data = Path(job.demos.source)
    data = str(data.absolute()) if data.exists() else job.demos.source
    return json.dumps({"options": options, "config": job.cfg.to_yaml(),
                       "dataset": [data, job.demos.episodes, job.demos.steps]}, default=str)


def write_partial(path: Path, job: Job, args, loop: TrainLoop, opt, sched, rng, gen) -> None:
    """Everything to continue bitwise, written atomically (checkpoint.write_atomically)."""
    import io

    import torch

    from .checkpoint import write_atomically
    from .h5safe import PRETRAIN_PARTIAL

    blob = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "generator": gen.get_state()}, blob)
    theta = job.policy.get_theta()

    def fill(f) -> None:
        f.create_dataset("theta", data=theta)
        f.create_dataset("torch_state", data=np.frombuffer(blob.getvalue(), np.uint8))
        f.attrs.update({"kind": PRETRAIN_PARTIAL, "done": loop.done,
                        "fingerprint": fingerprint(job, args),
                        "numpy_rng": json.dumps(rng.bit_generator.state),
                        "window": json.dumps(loop.window),
                        "curve": json.dumps(dataclasses.asdict(loop.curve))})

    write_atomically(path, fill, "pretraining's partial checkpoint",
                     theta.nbytes + blob.getbuffer().nbytes + 65536)


def read_partial(path: Path, job: Job, args) -> dict | None:
    """The partial checkpoint of an interrupted run of this same command (None if there is
    none); ConfigError if it is another command's or unreadable (naming what to do)."""
    import h5py

    if not path.exists():
        return None
    try:
        with h5py.File(path, "r") as f:
            state = {"theta": f["theta"][()], "torch_state": f["torch_state"][()].tobytes(),
                     **{k: f.attrs[k] for k in ("done", "fingerprint", "numpy_rng", "window",
                                                "curve")}}
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"--out: {path} (an interrupted pretraining) cannot be read "
                          f"({exc}); delete it to start afresh") from None
    then, now = json.loads(state["fingerprint"]), json.loads(fingerprint(job, args))
    if then != now:
        differ = [k for k in now["options"] if then["options"].get(k) != now["options"][k]]
        differ += [k for k in ("config", "dataset") if then[k] != now[k]]
        raise ConfigError(f"--out: {path} holds an interrupted pretraining of another command "
                          f"(it differs in: {', '.join(differ) or 'options'}); rerun that command"
                          " to continue it, or delete the file to start afresh")
    return state


def restore_partial(state: dict, job: Job, opt, sched, rng, gen) -> TrainLoop:
    """Put a read_partial state back into the policy, optimiser and generators."""
    import io

    import torch

    job.policy.set_theta(state["theta"])
    saved = torch.load(io.BytesIO(state["torch_state"]), weights_only=True)
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    gen.set_state(saved["generator"])
    rng.bit_generator.state = json.loads(state["numpy_rng"])
    curve = Curve(**json.loads(state["curve"]))
    print(f"es_mpi.pretrain: continuing from {int(state['done']):,} steps "
          f"(an interrupted run of this command)", flush=True)
    return TrainLoop(curve, int(state["done"]), json.loads(state["window"]))


def prepare_output(args, job: Job) -> dict | None:
    """Before step 1: --out's folder made and writable (a probe file), room for the output
    and a partial checkpoint, and the partial checkpoint to continue from (or None)."""
    from .h5safe import free_bytes
    from .outputs import check_writable

    out = check_writable("--out", args.out)
    need = 40 * job.policy.num_params + 32 * int(np.prod(job.stats.sum.shape)) + (1 << 20)
    folder = next(p for p in out.parents if p.exists())
    free = free_bytes(folder)
    if free is not None and free < need:
        raise ConfigError(f"--out: {folder} has {free / 1e6:.1f} MB free; the output and "
                          f"its partial checkpoints need about {need / 1e6:.1f} MB")
    return read_partial(partial_path(out), job, args)


# ----------------------------------------------------------------------------- set-up
def check_dataset(demos, env, cfg: JobConfig) -> None:
    """The dataset's spaces must be the job's (ConfigError); a dataset collected by es_mpi in
    another environment setting (id, frame pipeline) gets a warning."""
    from .demos import space_mismatch, space_summary
    from .init_from import MUST_MATCH, setting_differences

    for what, have, want in (("observation", demos.observation_space, env.observation_space),
                             ("action", demos.action_space, env.action_space)):
        msg = space_mismatch(f"--data {demos.source}: its {what}", space_summary(have),
                             space_summary(want))
        if msg:
            raise ConfigError(msg)
    recorded = {f"env.{k}": v for k, v in (demos.es_mpi_meta("env") or {}).items()}
    differ = setting_differences(recorded, cfg, "the dataset",
                                 [k for k in MUST_MATCH if k in recorded])
    if differ:
        print("es_mpi.pretrain: WARNING: the dataset was collected in another environment "
              "setting:\n  " + "\n  ".join(differ), file=sys.stderr, flush=True)


def check_args(args) -> None:
    """The command line's numbers in range and --out not a folder (ConfigError naming the
    option): checked before any training, so nothing fails or loops at its end."""
    bounds = [("--steps", args.steps, 1), ("--eval-every", args.eval_every, 1),
              ("--eval-episodes", args.eval_episodes, 0), ("--threads", args.threads, 1),
              ("--heldout-batches", args.heldout_batches, 0), ("--seed", args.seed, 0),
              ("--eval-seed", args.eval_seed, 0), ("--checkpoint-every", args.checkpoint_every, 0)]
    if args.eval_max_steps is not None:
        bounds.append(("--eval-max-steps", args.eval_max_steps, 1))
    for option, value, least in bounds:
        if value < least:
            raise ConfigError(f"{option}: must be at least {least}, got {value}")
    if not 0 <= args.heldout_fraction < 1:
        raise ConfigError(f"--heldout-fraction: must be in [0, 1), got {args.heldout_fraction}")
    if Path(args.out).is_dir():
        raise ConfigError(f"--out: {args.out} is a folder; name the .h5 file to write")


def setup(args) -> Job:
    """Job, environment, policy (its initial theta from run.seed), dataset: ConfigError on
    bad input, before any training."""
    import torch

    from .config import load_job
    from .demos import load_demos
    from .envs import make_env
    from .policies import make_policy
    from .rollout import make_normalizer

    check_args(args)
    torch.set_num_threads(args.threads)
    cfg = load_job(args.job, args.overrides)
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, init_from=None))
    if cfg.policy.vbn:
        raise ConfigError("policy.vbn: pretraining a policy with virtual batch norm is not "
                          "supported (its statistics come from ES's reference batch)")
    if parse_action_bins(cfg.policy.action_bins)[0] != "continuous":
        raise ConfigError(f"policy.action_bins={cfg.policy.action_bins}: pretraining a binned "
                          "policy is not supported (an argmax over bins has no gradient)")
    demos = load_demos(args.data, args.allow_incomplete)
    env = make_env(cfg.env)
    check_dataset(demos, env, cfg)
    try:
        policy = make_policy(cfg.policy, env.observation_space, env.action_space, cfg.run.seed,
                             obs_normalized=cfg.env.normalize_obs)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    family = family_of(policy)
    settings = recipe_settings(family, args.recipe, args.set)
    stats = dataset_stats(demos, cfg.env.normalize_obs and args.obs_stats == "dataset",
                          cfg.env.obs_squares)
    corpus = make_corpus(demos, cfg, make_normalizer(cfg.env, stats), args.heldout_fraction,
                         settings.terminal_reward)
    return Job(cfg, env, policy, corpus, stats, settings, family != "feedforward", demos)


# ----------------------------------------------------------------------------- output
def write_pretrained(path: Path, job: Job, curve: Curve, args) -> Path:
    """A checkpoint-format file (iteration 0, fresh optimiser) that es_mpi.evaluate reads and
    run.init_from starts from, with the `pretrain/` group (docs/results-format.md)."""
    from .checkpoint import TrainState, save_checkpoint
    from .demos import space_summary
    from .es import OptimizerState
    from .results import COLUMNS

    theta = job.policy.get_theta()
    state = TrainState(0, theta, OptimizerState.zeros(theta.size), job.stats,
                       prev_lengths=np.zeros(0, dtype=np.int64),
                       results={k: np.zeros(0, dtype=d) for k, (d, _, _) in COLUMNS.items()})
    datasets = {"step": np.array(curve.step, dtype=np.int64),
                "loss": np.array(curve.loss, dtype=np.float64),
                "eval_step": np.array(curve.eval_step, dtype=np.int64),
                "heldout_loss": np.array(curve.heldout_loss, dtype=np.float64),
                "eval_return": np.array(curve.eval_return, dtype=np.float64)}
    attrs = {"dataset": str(job.demos.source), "dataset_episodes": np.int64(job.demos.episodes),
             "dataset_steps": np.int64(job.demos.steps),
             "dataset_return_mean": float(np.mean(job.demos.episode_returns())),
             "heldout_episodes": np.int64(len(job.corpus.heldout[0])),
             "steps": np.int64(args.steps), "seed": np.int64(args.seed),
             "obs_stats": args.obs_stats, "eval_episodes": np.int64(args.eval_episodes),
             "eval_seed": np.int64(args.eval_seed), "train_seconds": float(curve.train_seconds),
             "settings": json.dumps(dataclasses.asdict(job.settings)),
             "observation_space": json.dumps(space_summary(job.env.observation_space)),
             "action_space": json.dumps(space_summary(job.env.action_space))}
    rng = {"scheme": "initial theta: torch.manual_seed(run.seed); training windows: "
                     "default_rng([seed, 0xBC]); dropout masks: torch.Generator(seed)",
           "run_seed": np.int64(job.cfg.run.seed), "seed": np.int64(args.seed)}
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(path, state, job.cfg.to_yaml(), rng,
                           extra_group=("pretrain", datasets, attrs))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    import os

    families = "\n".join(f"  {k}: {dataclasses.asdict(v)}" for k, v in FAMILIES.items())
    p = argparse.ArgumentParser(prog="python -m es_mpi.pretrain",
                                description=" ".join(__doc__.splitlines()[:2]),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="settings (--set) and their defaults per family:\n" + families)
    p.add_argument("job", help="job YAML whose policy to pretrain, e.g. jobs/humanoid_dt.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the job")
    p.add_argument("--data", required=True,
                   help="Minari dataset: its folder, its data/ folder, or a local dataset id")
    p.add_argument("--steps", type=int, required=True, help="gradient steps")
    p.add_argument("--out", required=True, help="output .h5 (for run.init_from / evaluate)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change one training setting (see below), e.g. --set lr=3e-4")
    p.add_argument("--recipe", choices=("es_mpi", "authors"), default="es_mpi",
                   help="authors: Lorenc & Neruda's pretraining (per family: "
                        + "; ".join(f"{k}: {' '.join(v)}" for k, v in AUTHORS_RECIPE.items())
                        + "; --obs-stats none); --set still changes single settings")
    p.add_argument("--obs-stats", choices=("dataset", "none"), default=None,
                   help="normalise observations with the dataset's statistics (default; with "
                        "--recipe authors: none) or not at all (Lorenc & Neruda); ignored "
                        "unless env.normalize_obs")
    p.add_argument("--seed", type=int, default=0, help="seed of the windows and dropout masks")
    p.add_argument("--eval-every", type=int, help="steps between evaluations (default steps/10)")
    p.add_argument("--eval-episodes", type=int, default=5, help="episodes per evaluation (0: none)")
    p.add_argument("--eval-seed", type=int, default=0,
                   help="evaluation episode i: seed EVAL_SEED+i")
    p.add_argument("--eval-max-steps", type=int, help="cap on evaluation episode length")
    p.add_argument("--heldout-fraction", type=float, default=0.05,
                   help="share of the episodes held out (at least one if there are two)")
    p.add_argument("--heldout-batches", type=int, default=4, help="batches of held-out loss")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    p.add_argument("--checkpoint-every", type=int, default=CHECKPOINT_EVERY,
                   help="steps between checkpoints of the whole training state to "
                        "OUT.partial.h5 (0: none); the same command again continues from it "
                        f"(default {CHECKPOINT_EVERY})")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="train on a dataset whose es_mpi.collect was interrupted")
    args = p.parse_args(argv)
    args.eval_every = args.eval_every or max(1, args.steps // 10)
    if args.obs_stats is None:
        args.obs_stats = "none" if args.recipe == "authors" else "dataset"
    return args


def main(argv: list[str] | None = None) -> int:
    from .launch import run_tool

    return run_tool(pretrain_command, parse_args(argv))


def pretrain_command(args) -> int:
    """Check everything and the output, train (continuing an interrupted run), write --out."""
    job = setup(args)
    partial = prepare_output(args, job)
    d = job.demos
    print(f"es_mpi.pretrain: {job.cfg.env.id}, policy {job.cfg.policy.kind} with "
          f"{job.policy.num_params:,} parameters; {d.source}: {d.episodes} episodes, "
          f"{d.steps:,} steps, return mean {np.mean(d.episode_returns()):.2f} "
          f"({len(job.corpus.heldout[0])} episodes held out); settings "
          f"{dataclasses.asdict(job.settings)}", flush=True)
    try:
        curve = train(job, args, partial)
        path = write_pretrained(Path(args.out), job, curve, args)
    except (OSError, RuntimeError) as exc:
        from .h5safe import DiskFullError, is_no_space

        if not (isinstance(exc, DiskFullError) or is_no_space(exc)):
            raise
        kept = partial_path(args.out)
        then = f"it continues from {kept}" if kept.exists() else "it starts afresh"
        raise DiskFullError(f"{exc}; free space and run the same command: {then}") from exc
    partial_path(args.out).unlink(missing_ok=True)
    print(f"es_mpi.pretrain: {summary(curve, args)}; wrote {path}", flush=True)
    return 0


def summary(curve: Curve, args) -> str:
    """Speed, loss, and the held-out loss and evaluation return where measured."""
    rate = args.steps / curve.train_seconds if curve.train_seconds > 0 else float("nan")
    parts = [f"{args.steps:,} steps in {curve.train_seconds:.1f} s ({rate:.1f} steps/s); loss "
             f"{curve.loss[0]:.4g} -> {curve.loss[-1]:.4g}"]
    if np.isfinite(curve.heldout_loss[-1]):
        parts.append(f"held-out {curve.heldout_loss[-1]:.4g}")
    if args.eval_episodes:
        parts.append(f"eval return {curve.eval_return[-1]:.2f}")
    return ", ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
