"""The ES update as small pure functions on numpy arrays (no MPI, no torch).

Conventions: N mirrored pairs; returns_pos[j], returns_neg[j] are the returns of theta + sigma*eps_j
and theta - sigma*eps_j. All steps *ascend* the fitness.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np


# ----------------------------------------------------------------------------- fitness
def _target_fitness(returns: np.ndarray, targets: np.ndarray | None,
                    return_weight: float) -> np.ndarray:
    """-|R - R*_j| + w R: the closer episode (j, sign) came to its pair's target R*_j, the
    fitter. With 0 < w < 1 the best return is still R*_j, but an undershoot costs 1 + w per
    unit and an overshoot 1 - w: a policy that cannot tell targets apart is pushed up rather
    than to the median target (w = 0: plain -|R - R*_j|)."""
    if targets is None:
        raise ValueError("fitness target_return needs the pairs' targets")
    fitness = -np.abs(returns - np.asarray(targets, dtype=np.float64)[:, None])
    return fitness + return_weight * returns if return_weight else fitness


# es.fitness -> (returns (N, 2), targets (N,) or None, es.target_return_weight) -> fitness
# (N, 2), the values that the fitness shaping ranks. return: both papers; target_return:
# es_mpi's return-conditioned ES (neither paper)
FITNESS = {
    "return": lambda returns, targets, return_weight: returns,
    "target_return": _target_fitness,
}


def episode_fitness(returns: np.ndarray, targets: np.ndarray | None, kind: str,
                    return_weight: float = 0.0) -> np.ndarray:
    """Fitness (N, 2) of the 2N episodes from their returns (N, 2) and the pairs' targets."""
    if kind not in FITNESS:
        raise ValueError(f"unknown fitness {kind!r}")
    return FITNESS[kind](np.asarray(returns, dtype=np.float64), targets, return_weight)


# ----------------------------------------------------------------------------- fitness shaping
def ranks(x: np.ndarray, ties: str = "average") -> np.ndarray:
    """0-based ranks of a 1-D array as float64.

    ties="average": equal values share the mean of the ranks they span (they carry no
    information, so they get equal weight); ties="position": equal values are ranked in order
    of position (a stable sort), the deterministic stand-in for the references' np.argsort.
    Either way the result depends on the values only, never on who computed them.
    """
    x = np.asarray(x)
    order = np.argsort(x, kind="stable")
    out = np.empty(x.size, dtype=np.float64)
    if ties == "position":
        out[order] = np.arange(x.size)
        return out
    if ties != "average":
        raise ValueError(f"unknown tie rule {ties!r}")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])  # first index of each run of ties
    counts = np.diff(np.r_[starts, x.size])
    mean_rank = starts + (counts - 1) / 2.0  # mean of starts .. starts + counts - 1
    out[order] = np.repeat(mean_rank, counts)
    return out


def centered_ranks(x: np.ndarray, ties: str = "average") -> np.ndarray:
    """Ranks of all entries of x (any shape) mapped linearly onto [-0.5, 0.5] (OpenAI-ES)."""
    flat = np.asarray(x, dtype=np.float64).ravel()
    if flat.size < 2:
        return np.zeros(np.shape(x))
    y = ranks(flat, ties) / (flat.size - 1) - 0.5
    return y.reshape(np.shape(x))


def _centered_rank_weights(pos: np.ndarray, neg: np.ndarray, ties: str) -> np.ndarray:
    """Salimans et al.: rank all 2N returns onto [-0.5, 0.5]; w_j = r+_j - r-_j."""
    r = centered_ranks(np.stack([pos, neg], axis=1), ties)
    return r[:, 0] - r[:, 1]


def _pair_rank_weights(pos: np.ndarray, neg: np.ndarray, ties: str) -> np.ndarray:
    """Lorenc & Neruda: rank the N differences F+_j - F-_j onto [-1, 1]."""
    return 2.0 * centered_ranks(pos - neg, ties)


# fitness_shaping key -> (returns+, returns-, tie rule) -> weights (N,)
FITNESS_SHAPING = {"centered_ranks": _centered_rank_weights, "pair_ranks": _pair_rank_weights}


def fitness_weights(returns_pos: np.ndarray, returns_neg: np.ndarray, shaping: str,
                    ties: str = "average") -> np.ndarray:
    """Weight w_j of eps_j in the gradient, shape (N,), by the registered `shaping`."""
    if shaping not in FITNESS_SHAPING:
        raise ValueError(f"unknown fitness shaping {shaping!r}")
    pos = np.asarray(returns_pos, dtype=np.float64)
    neg = np.asarray(returns_neg, dtype=np.float64)
    return FITNESS_SHAPING[shaping](pos, neg, ties)


# ----------------------------------------------------------------------------- gradient
# Coordinates per block of the NumPy noise sum: the float64 accumulator and temporary (128 KiB
# each) and the float32 table slices they read stay in a core's L2 cache while all N eps pass.
NOISE_SUM_BLOCK = 1 << 14
# Coordinates per block of the compiled kernel: its float64 accumulator (256 KiB) stays in L2
# while the eps stream past 8 at a time (bench/update.py measured 16K..64K).
KERNEL_BLOCK = 1 << 15


def weighted_noise_sum(table: np.ndarray, offsets: np.ndarray, weights: np.ndarray,
                       lo: int, hi: int, block: int | None = None,
                       kernel: str | None = None) -> np.ndarray:
    """sum_j w_j * eps_j[lo:hi] in float64, summed in order of j; eps_j = table[off_j:][:dim].

    Each coordinate is accumulated independently in the fixed order j = 0..N-1, each product
    w_j * float64(x) rounded before its add, so the bits of g[lo:hi] do not depend on the range
    bounds, on the block size, on how many ranks there are, on who evaluated which j, or on
    which implementation ran. A node can split [0, dim) into ranges and compute them in
    parallel. Zero weights are skipped. `kernel`: a key of NOISE_SUMS, None = the fastest
    available (the compiled kernel for a float32 contiguous table); `block`: coordinates per
    cache block, None = that implementation's own.
    """
    offsets = np.asarray(offsets, dtype=np.int64).ravel()
    weights = np.asarray(weights, dtype=np.float64).ravel()
    _check_slices(table, offsets, weights, lo, hi)
    keep = weights != 0.0
    offsets, weights = np.ascontiguousarray(offsets[keep]), np.ascontiguousarray(weights[keep])
    if kernel is None:
        kernel = "numpy" if KERNEL_UNAVAILABLE or not _kernel_table(table) else "kernel"
        if KERNEL_UNAVAILABLE:
            _notice_fallback()
    if kernel not in NOISE_SUMS:
        raise ValueError(f"noise-sum kernel {kernel!r} is not available here "
                         f"(available: {sorted(NOISE_SUMS)}; {KERNEL_UNAVAILABLE or 'all built'})")
    return NOISE_SUMS[kernel](table, offsets, weights, lo, hi, block)


def _check_slices(table: np.ndarray, offsets: np.ndarray, weights: np.ndarray, lo: int,
                  hi: int) -> None:
    if offsets.size != weights.size:
        raise ValueError(f"{offsets.size} offsets but {weights.size} weights")
    if not 0 <= lo <= hi:
        raise ValueError(f"coordinate range [{lo}, {hi}) is not a range")
    bad = np.flatnonzero((offsets < 0) | (offsets > len(table) - hi))
    if hi > lo and bad.size:
        j = int(bad[0])
        raise ValueError(f"offset {offsets[j]} of eps {j}: coordinates [{lo}, {hi}) run outside "
                         f"the noise table of {len(table)} values")


def _numpy_noise_sum(table: np.ndarray, offsets: np.ndarray, weights: np.ndarray, lo: int,
                     hi: int, block: int | None) -> np.ndarray:
    """The reference: per cache block of coordinates, for each eps in order, NumPy multiplies
    the slice into a float64 temporary (rounding each product) and adds it to the block."""
    block = block or NOISE_SUM_BLOCK
    acc = np.zeros(hi - lo, dtype=np.float64)
    tmp = np.empty(min(block, hi - lo), dtype=np.float64)
    # np.float64 scalars: a bare Python float would make NumPy multiply in float32 (NEP 50)
    terms = [(int(off), np.float64(w)) for off, w in zip(offsets, weights)]
    for b0 in range(lo, hi, block):
        b1 = min(b0 + block, hi)
        a, t = acc[b0 - lo: b1 - lo], tmp[: b1 - b0]
        for off, w in terms:
            np.multiply(table[off + b0: off + b1], w, out=t)
            a += t
    return acc


def _c_noise_sum(table: np.ndarray, offsets: np.ndarray, weights: np.ndarray, lo: int, hi: int,
                 block: int | None) -> np.ndarray:
    """The same sum in es_mpi/_noise_sum.c: one fused loop, 8 eps per pass over a block."""
    acc = np.empty(hi - lo, dtype=np.float64)
    _noise_sum.weighted_sum(acc, table, offsets, weights, lo, block or KERNEL_BLOCK)
    return acc


def _kernel_table(table: np.ndarray) -> bool:
    return isinstance(table, np.ndarray) and table.dtype == np.float32 and table.ndim == 1 \
        and table.flags.c_contiguous


def _kernel_same_bits(module) -> bool:
    """Does the compiled kernel give NumPy's bits on a small random case, SIMD and baseline?
    (A build that fused multiply-adds or reassociated would differ on almost every coordinate.)"""
    rng = np.random.default_rng(0)
    table = rng.standard_normal(512).astype(np.float32)
    offsets, weights = rng.integers(0, 400, 37), rng.normal(size=37)
    ref = _numpy_noise_sum(table, offsets, weights, 3, 100, 16)
    for simd in (True, False):
        acc = np.empty(97)
        module.weighted_sum(acc, table, offsets, weights, 3, 16, simd)
        if not np.array_equal(acc, ref):
            return False
    return True


def _load_kernel():
    """(the compiled module, "") if it is built and exact here, else (None, why not)."""
    try:
        from es_mpi import _noise_sum as module
    except ImportError as e:
        return None, f"the compiled noise-sum kernel is not built ({e})"
    try:
        exact = _kernel_same_bits(module)
    except Exception as e:  # a kernel from another version of this file: do not break imports
        return None, f"the compiled noise-sum kernel fails its check ({e!r}; rebuild it)"
    if not exact:
        return None, ("the compiled noise-sum kernel's bits differ from NumPy's "
                      "(fused multiply-add?)")
    return module, ""


_noise_sum, KERNEL_UNAVAILABLE = _load_kernel()  # why the kernel cannot run, "" when it can
# name -> (table, offsets, weights (no zeros), lo, hi, block or None) -> float64 sum, same bits
NOISE_SUMS = {"numpy": _numpy_noise_sum} | ({"kernel": _c_noise_sum} if _noise_sum else {})
# what weighted_noise_sum runs by default, for logs: "kernel (avx2)", or "numpy"
NOISE_SUM_KERNEL = f"kernel ({_noise_sum.SIMD})" if _noise_sum else "numpy"
_fallback_noticed = False


def _notice_fallback() -> None:
    """One line on stderr, once per process, when the NumPy form runs for want of the kernel."""
    global _fallback_noticed
    if not _fallback_noticed:
        _fallback_noticed = True
        sys.stderr.write(f"[es_mpi] {KERNEL_UNAVAILABLE}; the update's noise sum runs in NumPy "
                         "(the same bits, about 7x slower; build it: pip install -e .)\n")


def gradient_estimate(noise_sum: np.ndarray, n_pairs: int, sigma: float,
                      divide_by_sigma: bool = True, divisor: str = "episodes") -> np.ndarray:
    """g = sum_j w_j eps_j / (count * sigma), count = 2N episodes or N pairs.

    Lorenc & Neruda: their table holds sigma*eps and they divide by 2 N sigma^2, i.e.
    sum(w eps) / (2 N sigma): divisor="episodes", divide_by_sigma=True.
    OpenAI's starter: sum(w eps) / 2N (no 1/sigma): divisor="episodes", divide_by_sigma=False.
    Under Adam the overall scale hardly matters, but it weighs the gradient against the L2
    term, and under SGD it is the step size.
    """
    count = 2 * n_pairs if divisor == "episodes" else n_pairs
    return noise_sum / (count * (sigma if divide_by_sigma else 1.0))


# ----------------------------------------------------------------------------- optimisers
@dataclass
class OptimizerState:
    """Everything an optimiser carries between steps (float64, same on every rank)."""

    step: int = 0
    m: np.ndarray = field(default_factory=lambda: np.zeros(0))  # momentum / first moment
    v: np.ndarray = field(default_factory=lambda: np.zeros(0))  # Adam second moment (unused by SGD)

    @classmethod
    def zeros(cls, dim: int) -> "OptimizerState":
        return cls(0, np.zeros(dim), np.zeros(dim))


def sgd_momentum_step(grad: np.ndarray, state: OptimizerState, lr: float,
                      momentum: float) -> tuple[np.ndarray, OptimizerState]:
    """OpenAI-ES SGD: v <- m v + (1 - m) g; step = lr v. Returns (step, new state)."""
    m = momentum * state.m + (1.0 - momentum) * grad
    return lr * m, OptimizerState(state.step + 1, m, state.v)


def adam_step(grad: np.ndarray, state: OptimizerState, lr: float, beta1: float = 0.9,
              beta2: float = 0.999, eps: float = 1e-8) -> tuple[np.ndarray, OptimizerState]:
    """Adam with bias correction folded into the step size (as in OpenAI-ES)."""
    t = state.step + 1
    m = beta1 * state.m + (1.0 - beta1) * grad
    v = beta2 * state.v + (1.0 - beta2) * grad * grad
    a = lr * np.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
    return a * m / (np.sqrt(v) + eps), OptimizerState(t, m, v)


# ----------------------------------------------------------------------------- weight decay
def l2_gradient(grad: np.ndarray, theta: np.ndarray, coeff: float) -> np.ndarray:
    """OpenAI's L2 form: the ascent direction gains -coeff * theta before the optimiser."""
    return grad - coeff * theta


def decoupled_decay(theta: np.ndarray, coeff: float) -> np.ndarray:
    """theta <- theta * (1 - coeff), applied after the optimiser step (Lorenc: factor 0.995)."""
    return theta * (1.0 - coeff)


def es_update(theta: np.ndarray, grad: np.ndarray, state: OptimizerState, cfg) -> tuple[
        np.ndarray, OptimizerState]:
    """One full update of float32 theta from an ascent gradient, per an `ESConfig`."""
    theta64 = theta.astype(np.float64)
    if cfg.weight_decay_mode == "l2":
        grad = l2_gradient(grad, theta64, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        step, state = sgd_momentum_step(grad, state, cfg.lr, cfg.momentum)
    elif cfg.optimizer == "adam":
        step, state = adam_step(grad, state, cfg.lr, cfg.adam_beta1, cfg.adam_beta2, cfg.adam_eps)
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}")
    theta64 = theta64 + step
    if cfg.weight_decay_mode == "decoupled":
        theta64 = decoupled_decay(theta64, cfg.weight_decay)
    return theta64.astype(np.float32), state


# ----------------------------------------------------------------------------- episode cap
def adaptive_episode_cap(env_limit: int, prev_lengths: np.ndarray | None, factor: float) -> int:
    """min(env limit, factor x mean episode length of the previous iteration)."""
    if factor <= 0 or prev_lengths is None or len(prev_lengths) == 0:
        return env_limit
    return int(min(env_limit, max(1, int(factor * float(np.mean(prev_lengths))))))


# ----------------------------------------------------------------------------- obs statistics
@dataclass
class ObsStats:
    """Running sums of observations (float64) for normalisation: mean and std with a floor.

    Both references: std = sqrt(max(sumsq / count - mean^2, var_floor)) with var_floor 1e-2.
    """

    sum: np.ndarray
    sumsq: np.ndarray
    count: float

    @classmethod
    def empty(cls, shape: tuple[int, ...], eps: float = 1e-2) -> "ObsStats":
        # OpenAI-ES starts with a pseudo-count eps at mean 0, variance 1 to avoid division by 0.
        return cls(np.zeros(shape), np.full(shape, eps), eps)

    def add(self, s: np.ndarray, ss: np.ndarray, n: float) -> None:
        self.sum += s
        self.sumsq += ss
        self.count += n

    @property
    def mean(self) -> np.ndarray:
        return self.sum / self.count

    def std(self, var_floor: float = 1e-2) -> np.ndarray:
        return np.sqrt(np.maximum(self.sumsq / self.count - self.mean**2, var_floor))
