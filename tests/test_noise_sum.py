"""The update's noise sum: the compiled kernel (es_mpi/_noise_sum.c) gives NumPy's bits exactly,
whatever the range split, block, SIMD path or number of eps; the NumPy fallback runs (with one
notice) where the kernel is missing."""
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from es_mpi import es

SIZE = 4096


def reference(table, offsets, weights, lo, hi):
    """The definition, one eps at a time over the whole range: the bits every path must give."""
    acc = np.zeros(hi - lo)
    for off, w in zip(offsets, weights):
        if w != 0.0:
            acc += table[off + lo: off + hi] * np.float64(w)
    return acc


def random_case(seed: int, n: int, dim: int):
    rng = np.random.default_rng(seed)
    table = rng.standard_normal(SIZE).astype(np.float32)
    offsets = rng.integers(0, SIZE - dim + 1, n)
    offsets[: n // 3] = SIZE - dim  # slices ending at the table's last value
    weights = rng.normal(size=n) * 10.0 ** rng.integers(-150, 150, n)  # products of any scale
    weights[rng.random(n) < 0.2] = 0.0
    weights[::7] *= 5e-324 / np.abs(weights[::7]).clip(1e-300)  # subnormal products
    return table, offsets, weights


def test_the_kernel_is_built_and_exact():
    """CI installs with a compiler: a kernel that failed to build (the build is optional) or
    that fails its import-time bit check must not pass unnoticed."""
    assert "kernel" in es.NOISE_SUMS, es.KERNEL_UNAVAILABLE
    assert es.NOISE_SUM_KERNEL.startswith("kernel")


@pytest.mark.parametrize("n", [0, 1, 2, 7, 8, 9, 17, 40])
@pytest.mark.parametrize("dim", [1, 15, 16, 17, 333])
def test_kernel_matches_numpy_bitwise(n, dim):
    table, offsets, weights = random_case(1000 * n + dim, n, dim)
    ref = reference(table, offsets, weights, 0, dim)
    for kernel in es.NOISE_SUMS:
        for block in (None, 1, 5, 16, dim, 10_000):
            got = es.weighted_noise_sum(table, offsets, weights, 0, dim, block, kernel)
            assert got.dtype == np.float64
            assert np.array_equal(got.view(np.uint64), ref.view(np.uint64)), (kernel, block)


@pytest.mark.parametrize("simd", [True, False])
def test_kernel_any_range_split_and_both_instruction_sets(simd):
    dim, n = 1001, 23
    table, offsets, weights = random_case(7, n, dim)
    full = reference(table, offsets, weights, 0, dim)
    keep = weights != 0
    for bounds in ([0, 1001], [0, 1, 1001], [0, 17, 500, 999, 1001], list(range(0, 1002, 91))
                   + [1001]):
        parts = []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            acc = np.empty(hi - lo)
            es._noise_sum.weighted_sum(acc, table, offsets[keep], weights[keep], lo, 64, simd)
            parts.append(acc)
        assert np.array_equal(np.concatenate(parts), full), bounds


def test_no_fused_multiply_add():
    """-(1 + 2^-23 + 2^-52) * 1 then (1 + 2^-52) * (1 + 2^-23): the rounded product cancels the
    first term exactly (0.0); a fused multiply-add would leave 2^-75 per pair."""
    one_up = np.float32(1 + 2.0**-23)
    table = np.concatenate([np.ones(40, np.float32), np.full(40, one_up, np.float32)])
    for pairs in (1, 4, 5, 8):
        offsets = np.tile([0, 40], pairs)
        weights = np.tile([-(1 + 2.0**-23 + 2.0**-52), 1 + 2.0**-52], pairs)
        for kernel in es.NOISE_SUMS:
            got = es.weighted_noise_sum(table, offsets, weights, 0, 37, kernel=kernel)
            assert np.array_equal(got, np.zeros(37)), (kernel, pairs)


def test_shipped_table_and_zero_weights_skipped():
    from es_mpi.noise import make_table

    table = make_table(200_000, noise_seed=5)
    rng = np.random.default_rng(5)
    dim, offsets, weights = 70_001, rng.integers(0, 200_000 - 70_001, 50), rng.normal(size=50)
    weights[::3] = 0.0
    ref = es.weighted_noise_sum(table, offsets, weights, 0, dim, kernel="numpy")
    assert np.array_equal(es.weighted_noise_sum(table, offsets, weights, 0, dim), ref)
    assert np.array_equal(es.weighted_noise_sum(table, offsets[weights != 0],
                                                weights[weights != 0], 0, dim), ref)


def test_slices_outside_the_table_are_refused():
    table = np.zeros(100, np.float32)
    for kernel in es.NOISE_SUMS:
        with pytest.raises(ValueError, match="offset 91 of eps 1"):
            es.weighted_noise_sum(table, [0, 91], [1.0, 1.0], 0, 10, kernel=kernel)
        with pytest.raises(ValueError, match="offset -1"):
            es.weighted_noise_sum(table, [-1], [1.0], 0, 10, kernel=kernel)
        assert es.weighted_noise_sum(table, [90], [1.0], 0, 10, kernel=kernel).shape == (10,)
    with pytest.raises(ValueError, match="outside the noise table"):  # the kernel's own check
        es._noise_sum.weighted_sum(np.empty(10), table, np.array([91]), np.ones(1), 0, 8)
    with pytest.raises(TypeError, match="table must be a 1-D contiguous array of float32"):
        es._noise_sum.weighted_sum(np.empty(10), table.astype(np.float64), np.array([0]),
                                   np.ones(1), 0, 8)


def test_bit_check_rejects_a_kernel_that_reorders():
    """The import-time check is what keeps a miscompiled kernel out: a reassociating one fails."""
    def dot_product(out, table, offsets, weights, lo, block, simd):
        out[:] = weights @ np.stack([table[o + lo: o + lo + out.size] for o in offsets])

    assert es._kernel_same_bits(es._noise_sum)
    assert not es._kernel_same_bits(types.SimpleNamespace(weighted_sum=dot_product))


def test_numpy_fallback_when_the_kernel_is_missing():
    """A process whose kernel cannot be imported (an install without a compiler) sums in NumPy,
    with the same bits, and says so once on stderr."""
    script = (
        "import sys; sys.modules['es_mpi._noise_sum'] = None\n"  # import fails as if unbuilt
        "import numpy as np; from es_mpi import es\n"
        "t = np.random.default_rng(0).standard_normal(500).astype(np.float32)\n"
        "o, w = np.array([3, 100, 7]), np.array([0.5, -1.25, 3.0])\n"
        "a = es.weighted_noise_sum(t, o, w, 0, 300); b = es.weighted_noise_sum(t, o, w, 5, 9)\n"
        "print(es.NOISE_SUM_KERNEL, sorted(es.NOISE_SUMS), a.tobytes().hex()[:64])\n")
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, env=env)
    table = np.random.default_rng(0).standard_normal(500).astype(np.float32)
    ref = reference(table, [3, 100, 7], [0.5, -1.25, 3.0], 0, 300)
    assert out.stdout.split() == ["numpy", "['numpy']", ref.tobytes().hex()[:64]]
    notice = out.stderr.strip().splitlines()
    assert len(notice) == 1 and "not built" in notice[0] and "NumPy" in notice[0], out.stderr
    ask_kernel = script.replace("0, 300)", "0, 300, None, 'kernel')")
    asked = subprocess.run([sys.executable, "-c", ask_kernel], capture_output=True, text=True,
                           env=env)
    assert asked.returncode != 0 and "'kernel' is not available" in asked.stderr, asked.stderr
