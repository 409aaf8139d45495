"""Job configuration: typed sections loaded from YAML, dotted overrides, validation.

A job file has four sections (`env`, `policy`, `es`, `run`). Every key is a field of the
dataclass for its section; unknown keys, missing required keys and bad values raise
`ConfigError` naming the key, before any MPI work starts.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

REQUIRED = ("run.seed", "run.iterations", "run.dir", "es.population", "es.sigma")


class ConfigError(ValueError):
    """A job file or override is invalid; the message names the key."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading every spelling of a number as one (YAML 1.1, which PyYAML
    implements, reads `1e-3`, `1E3` and `.5e-2` as strings: they need a dot and a signed
    exponent). Quoted scalars stay strings."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"""^(?:
     [-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """Parse YAML text (a job file, an override value, a saved config) with numbers read as
    numbers in every spelling: 1e-3, 1E3, +1.5, .5, 1_000, 1.0e+300."""
    return yaml.load(text, Loader=_Loader)


@dataclass
class EnvConfig:
    id: str = "InvertedPendulum-v5"  # gymnasium environment id
    max_episode_steps: Optional[int] = None  # episode limit; None = the env's own limit
    obs_stat_prob: float = 0.01  # probability that each training episode's observations feed the obs statistics
    normalize_obs: bool = True  # normalise observations with running mean/std (per pixel for frames)
    obs_var_floor: float = 1e-2  # std = sqrt(max(var, obs_var_floor)) (both references: 1e-2)
    obs_clip: Optional[float] = None  # clip normalised obs to ±obs_clip; null = none (Lorenc), 5 (OpenAI)
    # the squares summed into the observation statistics: exact, or (Atari uint8 frames)
    # uint8_wrap = each pixel's square modulo 256, as np.square of uint8 frames computes it in
    # Lorenc & Neruda's code: the variance falls below obs_var_floor, std = 0.1 (docs/fidelity.md)
    obs_squares: Literal["exact", "uint8_wrap"] = "exact"
    kwargs: dict = field(default_factory=dict)  # extra keyword arguments for gymnasium.make
    # Atari (ids 'ALE/...') preprocessing; defaults are Lorenc & Neruda's code but pool_order
    frame_skip: int = 4  # emulator frames per agent step (action repeated, reward summed)
    max_pool_frames: bool = True  # observation = pixel max of the last two frames of a step
    # the max of the two raw screens, then one resize (gymnasium), or each screen resized, then
    # the max of the two 84x84 frames (Lorenc & Neruda's ALE wrapper; the Hero jobs)
    pool_order: Literal["max_then_resize", "resize_then_max"] = "max_then_resize"
    noop_max: int = 0  # reset plays 1..noop_max no-op steps (uniform, from the reset seed); 0 = none
    screen_size: int = 84  # frames are resized (area average) to screen_size x screen_size
    grayscale: bool = True  # greyscale frames (False is not supported: 1 channel per frame)
    frame_stack: int = 4  # observation = the last frame_stack frames, (frame_stack, 84, 84) uint8
    # the stack after reset: zeros and the first frame (Lorenc), or the first frame repeated
    # (gymnasium's FrameStackObservation)
    frame_stack_reset: Literal["zeros", "repeat"] = "zeros"
    repeat_action_probability: float = 0.0  # ALE sticky actions; 0 = none (Lorenc), 0.25 (Machado et al.)
    full_action_space: bool = False  # 18 actions for every game instead of the game's minimal set
    max_frames: int = 108_000  # emulator frames per episode before truncation (30 min of play)
    terminal_on_life_loss: bool = False  # end the episode when a life is lost
    clip_rewards: bool = False  # reward -> sign(reward) per agent step (the paper: no clipping)


@dataclass
class PolicyConfig:
    kind: Literal["mlp", "cnn", "dt"] = "mlp"  # architecture; dt = Decision Transformer
    hidden: list = field(default_factory=lambda: [256, 256])  # MLP hidden layer widths
    activation: Literal["tanh", "relu"] = "tanh"  # MLP hidden activation
    # continuous actions: tanh = tanh(out) in [-1, 1] to the env, which clamps (Lorenc);
    # bounds = mid + half * tanh(out), inside the Box; linear = out itself (OpenAI)
    action_mapping: Literal["tanh", "bounds", "linear"] = "tanh"
    # MLP on Box actions, OpenAI's ac_bins: continuous = one output per action dimension, mapped
    # by action_mapping; uniform:N = N scores per dimension, the highest picks one of N evenly
    # spaced values from low to high; custom:v1,...,vk = k scores per dimension, the highest
    # picks v_i (values in [-1, 1], v1 = -1, vk = 1) rescaled to [low, high]. Ties: the first bin
    action_bins: str = "continuous"
    # discrete actions: argmax of the logits, or a sample from their softmax (Lorenc's Atari DT),
    # drawn from (run.seed, iteration, j, sign)
    discrete_action: Literal["argmax", "sample"] = "argmax"
    init: Literal["torch", "normc"] = "torch"  # MLP init: PyTorch default, or OpenAI's normc
    action_noise_std: float = 0.0  # N(0, std^2) added to Box actions (binned too) in training episodes (OpenAI 0.01)
    vbn: bool = False  # virtual batch norm in the image encoder (Salimans et al. 2017)
    vbn_batch: int = 128  # observations in the VBN reference batch (collected once per run)
    # image encoders multiply frames by this; null = 1/255 for raw uint8 frames, 1 for frames
    # normalised per pixel (env.normalize_obs). Lorenc's code: 1 always (raw 0..255 pixels)
    frame_scale: Optional[float] = None
    # Decision Transformer (defaults: Chen et al. 2021 gym DT, as Lorenc & Neruda on Humanoid)
    context: int = 20  # DT: timesteps K in the attention window (3K tokens: R, s, a)
    n_embd: int = 128  # DT: token embedding width
    n_layer: int = 3  # DT: transformer blocks
    n_head: int = 1  # DT: attention heads (must divide n_embd)
    inner_mult: int = 4  # DT: MLP inner width = inner_mult * n_embd
    max_ep_len: int = 1000  # DT: rows of the timestep embedding (later steps use the last row)
    rtg_scale: float = 0.001  # DT: returns-to-go are fed as R * rtg_scale (1/1000; Atari: 1)
    target_return: float = 6000.0  # DT: initial return-to-go of an episode, in reward units
    scaled_residual_init: bool = False  # DT: GPT-2's N(0, 0.02/sqrt(2 n_layer)) residual projections
    #                                     (nanoGPT); False = N(0, 0.02) everywhere (both references)
    dropout: float = 0.0  # DT: dropout on the GPT input, attention weights and residuals, active
    #                       in every episode, masks drawn from (run.seed, iteration, j, sign)
    # image DT: init of the return embedding and the conv encoder: torch = PyTorch default
    # (Chen et al.'s Atari code, Lorenc), normal = N(0, 0.02) like the GPT weights
    embed_init: Literal["torch", "normal"] = "torch"
    # DT per-step forward: window (exact), kv_cache (streaming, fastest), full (reference)
    inference: Literal["window", "kv_cache", "full"] = "window"


@dataclass
class ESConfig:
    population: int = 0  # mirrored pairs per iteration (2x episodes)
    sigma: float = 0.0  # perturbation standard deviation
    lr: float = 0.05  # optimiser step size
    optimizer: Literal["sgd", "adam"] = "sgd"  # sgd = SGD with momentum
    momentum: float = 0.9  # SGD momentum
    adam_beta1: float = 0.9  # Adam first-moment decay
    adam_beta2: float = 0.999  # Adam second-moment decay
    adam_eps: float = 1e-8  # Adam denominator epsilon
    fitness_shaping: Literal["pair_ranks", "centered_ranks"] = "pair_ranks"  # return -> weight
    tie_break: Literal["average", "position"] = "average"  # equal returns: mean rank, or by j
    # reset seeds: one per iteration for all 2N episodes (Lorenc), one per pair (both signs
    # alike), or one per episode (OpenAI); also keys the episodes' own randomness the same way
    env_seeds: Literal["per_iteration", "per_pair", "per_episode"] = "per_iteration"
    divide_by_sigma: bool = True  # gradient is sum(w eps)/(count sigma); False drops 1/sigma (OpenAI)
    grad_divisor: Literal["episodes", "pairs"] = "episodes"  # count = 2N episodes (both refs) or N pairs
    weight_decay: float = 0.005  # decay coefficient lambda
    weight_decay_mode: Literal["decoupled", "l2", "none"] = "decoupled"  # theta*(1-lambda) or L2 in g
    episode_cap_factor: float = 2.0  # cap = min(limit, factor x previous mean length); 0 disables
    noise_table_size: int = 250_000_000  # float32 N(0,1) values in the shared noise table
    noise_seed: int = 123  # seed of the noise table (independent of run.seed)
    eval_episodes: int = 1  # unperturbed episodes of theta per iteration (eval_return), and as
    #                         many again at each of es.eval_targets
    # what the update ranks (an es_mpi extension, in neither paper): return = the episode's
    # return (both papers); target_return = -|R - R*_j|: pair j gets a target return R*_j drawn
    # from (run.seed, t, j), both of its episodes start with return-to-go R*_j (DT only)
    fitness: Literal["return", "target_return"] = "return"
    # target_return: R*_j uniform over es.target_range, or one of es.target_values (uniformly)
    target_draw: Literal["uniform", "list"] = "uniform"
    target_range: list = field(default_factory=list)  # target_draw uniform: [low, high], reward units
    target_values: list = field(default_factory=list)  # target_draw list: the possible targets
    # target_return: fitness -|R - R*_j| + w R with w = target_return_weight in [0, 1): the best
    # return is still R*_j, but undershooting costs more than overshooting (keeps the policy able
    # to reach high targets); 0 = plain -|R - R*_j|
    target_return_weight: float = 0.0
    # DT: initial returns-to-go at which theta is also evaluated every iteration, es.eval_episodes
    # episodes each on the evaluation seeds; results columns eval_return_target_<i>
    eval_targets: list = field(default_factory=list)


@dataclass
class RunConfig:
    seed: int = 0  # run seed: initial theta, noise offsets, environment seeds
    iterations: int = 0  # ES iterations to run in total
    dir: str = ""  # run directory (config.yaml, results.h5, checkpoints/)
    checkpoint_every: int = 10  # write a checkpoint every this many iterations (and at the end)
    keep_checkpoints: int = 3  # newest checkpoints kept on disk
    verify_every: int = 1  # compare a hash of theta across ranks every this many iterations
    torch_threads: int = 1  # torch intra-op threads per rank
    # the noise sum of the update: world_split = every rank sums a range of the coordinates
    # (each node a block, its ranks a part of it) and the nodes exchange their blocks (one
    # Allgatherv of d float64 between one rank per node); node_split = the ranks of a node
    # split the coordinates and every node sums all of them; every_rank = each rank sums all
    # of them. All give the same bits (each coordinate is summed in order of j); on one node
    # world_split and node_split are the same, on many world_split reads 1/nodes of the table
    update: Literal["world_split", "node_split", "every_rank"] = "world_split"
    # which episodes a rank runs: dynamic = ranks take chunks of episodes from a shared counter
    # (MPI_Fetch_and_op), shrinking as the pool empties, evaluation episodes first; static = a
    # fixed block of pairs per rank. Both give the same bits (results are keyed by episode)
    assignment: Literal["dynamic", "static"] = "dynamic"
    # start from this file's theta and observation statistics instead of a fresh policy: a
    # pretrained policy (es_mpi.pretrain), a checkpoint, or a run directory (its newest
    # checkpoint); its policy must match this job's. A resumed run ignores it (the checkpoint
    # wins); null = a fresh policy from run.seed
    init_from: Optional[str] = None


@dataclass
class JobConfig:
    env: EnvConfig = field(default_factory=EnvConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    es: ESConfig = field(default_factory=ESConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS = {f.name: f.type for f in dataclasses.fields(JobConfig)}
_SECTION_CLASSES = {"env": EnvConfig, "policy": PolicyConfig, "es": ESConfig, "run": RunConfig}

# Keys that change no number a run computes (theta, returns, observation statistics, results
# columns): where it writes, how often it saves, prunes and checks, torch's threads, and how the
# work is shared out (the same bits either way). resume.RESUME_IGNORED_KEYS is these and
# run.iterations.
NUMBER_FREE_KEYS = ("run.dir", "run.checkpoint_every", "run.keep_checkpoints",
                    "run.verify_every", "run.torch_threads", "run.update", "run.assignment")

# Which jobs read a key: it applies to a job when all of its conditions (KEY_CONDITIONS) hold.
# For any other job, every value of the key computes the same numbers or is refused with a
# ConfigError (e.g. policy.vbn without image observations). Keys not listed apply to every job.
# The one record of this; tests/test_jobs_explicit.py makes each paper job name every key that
# applies to it (number_keys).
KEY_SCOPE: dict[str, tuple[str, ...]] = {
    **{f"env.{k}": ("atari",) for k in (
        "frame_skip", "max_pool_frames", "noop_max", "screen_size", "grayscale", "frame_stack",
        "frame_stack_reset", "repeat_action_probability", "full_action_space", "max_frames",
        "terminal_on_life_loss", "clip_rewards", "pool_order")},
    **{f"env.{k}": ("normalize_obs",) for k in (
        "obs_stat_prob", "obs_var_floor", "obs_clip", "obs_squares")},
    **{f"policy.{k}": ("mlp",) for k in ("hidden", "activation", "init")},
    **{f"policy.{k}": ("dt",) for k in (
        "context", "n_embd", "n_layer", "n_head", "inner_mult", "max_ep_len", "rtg_scale",
        "target_return", "scaled_residual_init", "dropout", "inference")},
    "policy.embed_init": ("dt", "atari"),
    "policy.action_mapping": ("box", "continuous"),
    "policy.action_bins": ("mlp", "box"),
    "policy.discrete_action": ("discrete",),
    "policy.vbn": ("image",),
    "policy.vbn_batch": ("vbn",),
    "policy.frame_scale": ("image",),
    "es.momentum": ("sgd",),
    **{f"es.{k}": ("adam",) for k in ("adam_beta1", "adam_beta2", "adam_eps")},
    "es.weight_decay": ("weight_decay",),
    "es.target_draw": ("target_return",),
    "es.target_range": ("target_return", "uniform_targets"),
    "es.target_values": ("target_return", "list_targets"),
    "es.target_return_weight": ("target_return",),
    "es.eval_targets": ("dt",),
}


def _atari(cfg: "JobConfig") -> bool:
    from .envs_atari import is_atari
    return is_atari(cfg.env.id)


def _continuous(cfg: "JobConfig") -> bool:
    return parse_action_bins(cfg.policy.action_bins)[0] == "continuous"


# condition -> (job, whether its env's actions are Discrete) -> holds
KEY_CONDITIONS: dict[str, typing.Callable[["JobConfig", bool], bool]] = {
    "atari": lambda cfg, discrete: _atari(cfg),
    "mlp": lambda cfg, discrete: cfg.policy.kind == "mlp",
    "dt": lambda cfg, discrete: cfg.policy.kind == "dt",
    "image": lambda cfg, discrete: _atari(cfg) and cfg.policy.kind in ("cnn", "dt"),
    "vbn": lambda cfg, discrete: cfg.policy.vbn,
    "box": lambda cfg, discrete: not discrete,
    "discrete": lambda cfg, discrete: discrete,
    "continuous": lambda cfg, discrete: _continuous(cfg),
    "normalize_obs": lambda cfg, discrete: cfg.env.normalize_obs,
    "sgd": lambda cfg, discrete: cfg.es.optimizer == "sgd",
    "adam": lambda cfg, discrete: cfg.es.optimizer == "adam",
    "weight_decay": lambda cfg, discrete: cfg.es.weight_decay_mode != "none",
    "target_return": lambda cfg, discrete: cfg.es.fitness == "target_return",
    "uniform_targets": lambda cfg, discrete: cfg.es.target_draw == "uniform",
    "list_targets": lambda cfg, discrete: cfg.es.target_draw == "list",
}


def all_keys() -> list[str]:
    """Every key of every section, as section.key, in declaration order."""
    return [f"{name}.{f.name}" for name, cls in _SECTION_CLASSES.items()
            for f in dataclasses.fields(cls)]


def number_keys(cfg: "JobConfig", discrete_actions: bool) -> list[str]:
    """The keys that can change a number `cfg` computes: every key, less NUMBER_FREE_KEYS and
    those whose KEY_SCOPE does not hold for it (`discrete_actions`: its env's action space
    is Discrete). A job file naming all of them cannot drift when a default changes."""
    return [k for k in all_keys() if k not in NUMBER_FREE_KEYS and all(
        KEY_CONDITIONS[c](cfg, discrete_actions) for c in KEY_SCOPE.get(k, ()))]


def parse_action_bins(spec: str) -> tuple[str, int, tuple[float, ...]]:
    """policy.action_bins -> (mode, bins per action dimension, custom values); ValueError if bad.

    'continuous' -> ('continuous', 0, ()); 'uniform:5' -> ('uniform', 5, ());
    'custom:-1,0,1' -> ('custom', 3, (-1.0, 0.0, 1.0)).
    """
    mode, sep, arg = spec.partition(":")
    if mode == "continuous" and not arg.strip():
        return "continuous", 0, ()
    if mode == "uniform" and arg.strip().isdigit() and int(arg) >= 2:
        return "uniform", int(arg), ()
    if mode == "custom" and sep:
        try:
            values = tuple(float(v) for v in arg.split(","))
        except ValueError:
            values = ()
        if (len(values) >= 2 and values[0] == -1 and values[-1] == 1
                and all(-1 <= v <= 1 for v in values)):
            return "custom", len(values), values
    raise ValueError(f"policy.action_bins: must be {_BINS_ALLOWED}, got {spec!r}")


_BINS_ALLOWED = ("continuous, uniform:N (N >= 2 bins per action dimension) or custom:v1,...,vk "
                 "(k >= 2 values in [-1, 1], v1 = -1, vk = 1)")


def _bins_ok(spec: str) -> bool:
    try:
        parse_action_bins(spec)
    except ValueError:
        return False
    return True


def _numbers(v: list) -> bool:
    return all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
               for x in v)


# theta is float32: a perturbation sigma eps or an Adam step (about lr) at least this large
# is inf in every coordinate
FLOAT32_MAX = 3.4028234663852886e38
_BELOW_FLOAT32_MAX = "a positive number below 3.4e38 (theta is float32)"

# Range checks beyond the type: key -> (predicate, what is allowed)
_RULES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "es.population": (lambda v: v > 0, "a positive integer"),
    "es.sigma": (lambda v: 0 < v < FLOAT32_MAX, _BELOW_FLOAT32_MAX),
    "es.lr": (lambda v: 0 < v < FLOAT32_MAX, _BELOW_FLOAT32_MAX),
    "es.momentum": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "es.adam_beta1": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "es.adam_beta2": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "es.adam_eps": (lambda v: v > 0, "a positive number"),
    "es.weight_decay": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "es.episode_cap_factor": (lambda v: v >= 0, "a number >= 0"),
    "es.noise_table_size": (lambda v: v > 0, "a positive integer"),
    "es.eval_episodes": (lambda v: v >= 0, "an integer >= 0"),
    "es.target_range": (lambda v: v == [] or (len(v) == 2 and _numbers(v) and v[0] < v[1]),
                        "[low, high] with low < high"),
    "es.target_values": (_numbers, "a list of numbers"),
    "es.target_return_weight": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "es.eval_targets": (_numbers, "a list of numbers"),
    "env.obs_stat_prob": (lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    "env.max_episode_steps": (lambda v: v is None or v > 0, "a positive integer or null"),
    "env.frame_skip": (lambda v: v > 0, "a positive integer"),
    "env.noop_max": (lambda v: v >= 0, "an integer >= 0 (0 = no no-op starts)"),
    "env.screen_size": (lambda v: v > 0, "a positive integer"),
    "env.grayscale": (lambda v: v is True, "true (only greyscale frames are supported)"),
    "env.frame_stack": (lambda v: v > 0, "a positive integer"),
    "env.repeat_action_probability": (lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    "env.max_frames": (lambda v: v > 0, "a positive integer"),
    "policy.vbn_batch": (lambda v: v > 1, "an integer >= 2"),
    "policy.hidden": (lambda v: len(v) > 0 and all(isinstance(h, int) and h > 0 for h in v),
                      "a non-empty list of positive integers"),
    "policy.context": (lambda v: v > 0, "a positive integer"),
    "policy.n_embd": (lambda v: v > 0, "a positive integer"),
    "policy.n_layer": (lambda v: v > 0, "a positive integer"),
    "policy.n_head": (lambda v: v > 0, "a positive integer"),
    "policy.inner_mult": (lambda v: v > 0, "a positive integer"),
    "policy.max_ep_len": (lambda v: v > 0, "a positive integer"),
    "policy.rtg_scale": (lambda v: v > 0, "a positive number"),
    "policy.dropout": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "policy.frame_scale": (lambda v: v is None or v > 0, "a positive number or null"),
    "policy.action_noise_std": (lambda v: v >= 0, "a number >= 0"),
    "policy.action_bins": (_bins_ok, _BINS_ALLOWED),
    "env.obs_var_floor": (lambda v: v > 0, "a positive number"),
    "env.obs_clip": (lambda v: v is None or v > 0, "a positive number or null (no clipping)"),
    "run.seed": (lambda v: v >= 0, "an integer >= 0"),
    "run.iterations": (lambda v: v > 0, "a positive integer"),
    "run.dir": (lambda v: v.strip() != "", "a non-empty path"),
    "run.checkpoint_every": (lambda v: v > 0, "a positive integer"),
    "run.keep_checkpoints": (lambda v: v > 0, "a positive integer"),
    "run.verify_every": (lambda v: v >= 0, "an integer >= 0 (0 = never)"),
    "run.torch_threads": (lambda v: v > 0, "a positive integer"),
    "run.init_from": (lambda v: v is None or v.strip() != "", "a file path or null"),
}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false",
            list: "a list", dict: "a mapping", type(None): "null"}.get(tp, str(tp))


_NON_FINITE = ("inf", "infinity", "nan")  # spellings Python's float() reads but YAML does not


def _non_finite_text(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lstrip("+-").lower() in _NON_FINITE


def _non_finite(value: Any) -> bool:
    """inf or NaN, as a float or as text."""
    return (isinstance(value, float) and not math.isfinite(value)) or _non_finite_text(value)


def _number_text(value: Any) -> Any:
    """A quoted number ('1e-3' from a programmatic dict or a quoted YAML scalar) as a float;
    anything else unchanged."""
    if isinstance(value, str) and not _non_finite_text(value):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        for arg in typing.get_args(tp):
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        value = _number_text(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        value = _number_text(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp in (str, list, dict):
        if isinstance(value, tp):
            return value
    numeric = (int, float)
    if (tp in numeric or set(typing.get_args(tp)) & set(numeric)) and _non_finite(value):
        raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _section_from_dict(name: str, data: Any, present: set[str]) -> Any:
    cls = _SECTION_CLASSES[name]
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{name}.{key}"
        if key not in known:
            raise ConfigError(f"unknown key {dotted!r}; allowed keys in '{name}': "
                              + ", ".join(sorted(known)))
        value = _coerce(dotted, value, hints[key])
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{dotted}: must be a finite number, got {value!r}")
        if dotted in _RULES:
            ok, allowed = _RULES[dotted]
            if not ok(value):
                raise ConfigError(f"{dotted}: must be {allowed}, got {value!r}")
        kwargs[key] = value
        present.add(dotted)
    return cls(**kwargs)


def flatten(d: dict, prefix: str = "") -> dict:
    """{'es': {'sigma': 0.1}} -> {'es.sigma': 0.1}; empty mappings stay leaves."""
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """'es.sigma=0.1' -> ('es.sigma', 0.1); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if key.count(".") < 1:
        raise ConfigError(f"override {text!r}: key must be section.key, e.g. es.sigma=0.02")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {exc}") from None
    return key, value


def repeated_overrides(overrides: list[str]) -> list[str]:
    """One line per key that the overrides set more than once (the last value is used, so a
    wrapper script's defaults can be overridden after them; still worth a warning)."""
    values: dict[str, list[str]] = {}
    for text in overrides:
        if "=" in text:
            key, raw = text.split("=", 1)
            values.setdefault(key.strip(), []).append(raw)
    return [f"{key} is given {len(raws)} times ({', '.join(raws)}); the last one, "
            f"{raws[-1]}, is used" for key, raws in values.items() if len(raws) > 1]


def apply_override(data: dict, key: str, value: Any) -> None:
    """Set data[section][key...] = value for a dotted key (mapping fields may nest)."""
    parts = key.split(".")
    if parts[0] not in _SECTION_CLASSES:
        raise ConfigError(f"unknown section {parts[0]!r} in {key!r}; sections: "
                          + ", ".join(_SECTION_CLASSES))
    node = data
    for part in parts[:-1]:
        if node.get(part) is None:  # absent, or an empty section (`env:` with nothing under it)
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part!r} is not a mapping")
    node[parts[-1]] = value


def from_dict(data: Any, source: str = "job") -> JobConfig:
    """Build and validate a JobConfig from a plain nested dict."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping with sections "
                          + ", ".join(_SECTION_CLASSES))
    for name in data:
        if name not in _SECTION_CLASSES:
            raise ConfigError(f"unknown section {name!r}; sections: " + ", ".join(_SECTION_CLASSES))
    present: set[str] = set()
    sections = {name: _section_from_dict(name, data.get(name) or {}, present)
                for name in _SECTION_CLASSES}
    pol = sections["policy"]
    if pol.n_embd % pol.n_head:
        raise ConfigError(f"policy.n_head: must divide policy.n_embd={pol.n_embd}, "
                          f"got {pol.n_head}")
    missing = [k for k in REQUIRED if k not in present]
    if missing:
        raise ConfigError(f"{source}: required key(s) missing: " + ", ".join(missing))
    cfg = JobConfig(**sections)
    _check_combinations(cfg)
    return cfg


def _check_combinations(cfg: JobConfig) -> None:
    """Rules that involve more than one key."""
    pol = cfg.policy
    if pol.dropout > 0 and pol.inference == "kv_cache":
        raise ConfigError("policy.dropout: needs policy.inference 'window' or 'full' (dropout "
                          "masks are redrawn for every token at every step, so no per-block "
                          "keys/values can be cached)")
    _check_targets(cfg)
    if not _continuous(cfg) and pol.kind != "mlp":
        raise ConfigError(f"policy.action_bins={pol.action_bins}: binned actions are an MLP "
                          f"option (OpenAI's MujocoPolicy); got policy.kind {pol.kind!r}")
    if cfg.env.obs_squares == "uint8_wrap" and not _atari(cfg):
        raise ConfigError(f"env.obs_squares: uint8_wrap squares uint8 frames modulo 256 and needs "
                          f"an Atari env (ALE/...); {cfg.env.id!r} has other observations")
    if pol.vbn and cfg.env.normalize_obs:
        raise ConfigError("policy.vbn: use either virtual batch norm or env.normalize_obs "
                          "(per-pixel running normalisation), not both")


def _check_targets(cfg: JobConfig) -> None:
    """Return-conditioned training and evaluation need a Decision Transformer and targets."""
    es = cfg.es
    used = [f"{key}={value}" for key, value, on in (
        ("es.fitness", es.fitness, es.fitness == "target_return"),
        ("es.eval_targets", es.eval_targets, bool(es.eval_targets))) if on]
    if used and cfg.policy.kind != "dt":
        raise ConfigError(f"{used[0]}: sets the initial return-to-go of episodes, so it needs a "
                          f"Decision Transformer (policy.kind dt); got policy.kind "
                          f"{cfg.policy.kind!r}")
    if es.fitness != "target_return":
        return
    if es.target_draw == "uniform" and not es.target_range:
        raise ConfigError("es.target_range: es.fitness target_return with es.target_draw "
                          "uniform needs [low, high], e.g. es.target_range=[0, 1000]")
    if es.target_draw == "list" and not es.target_values:
        raise ConfigError("es.target_values: es.fitness target_return with es.target_draw list "
                          "needs a non-empty list of targets")


REPO = Path(__file__).resolve().parents[1]  # the checkout es_mpi runs from (pip install -e)


def job_path(path: str | Path) -> Path:
    """`path`, or the shipped job of that name (`jobs/NAME.yaml` of the repository) when a
    relative path is not found from the current directory: the README's commands then run
    from any directory."""
    path = Path(path)
    if path.is_file() or path.is_absolute() or not (REPO / path).is_file():
        return path
    return REPO / path


def load_job(path: str | Path, overrides: list[str] = ()) -> JobConfig:
    """Load a job YAML (see job_path), apply dotted `section.key=value` overrides, validate."""
    path = job_path(path)
    if not path.is_file():
        raise ConfigError(f"job file {str(path)!r} does not exist")
    try:
        data = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"job file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"job file {str(path)!r}: top level must be a mapping")
    for text in overrides:
        apply_override(data, *parse_override(text))
    return from_dict(data, source=str(path))


def loads(text: str) -> JobConfig:
    """Parse a resolved config text (as written to config.yaml / checkpoints)."""
    return from_dict(load_yaml(text), source="config text")
