"""The pure ES math: shaping, gradient estimate, optimisers, decay, episode cap."""
import numpy as np
import pytest

from es_mpi import es
from es_mpi.config import ESConfig
from es_mpi.noise import make_table


def test_centered_ranks_span_and_order():
    x = np.array([[3.0, -1.0], [10.0, 2.0]])
    r = es.centered_ranks(x)
    assert r.shape == x.shape
    np.testing.assert_allclose(sorted(r.ravel()), np.linspace(-0.5, 0.5, 4))
    assert r[1, 0] == 0.5 and r[0, 1] == -0.5


def test_centered_ranks_ties_position_rule_is_stable():
    r = es.centered_ranks(np.zeros(5), ties="position")
    np.testing.assert_allclose(r, np.linspace(-0.5, 0.5, 5))


def test_average_ranks_hand_computed():
    # values 3, 1, 3, 0, 3 -> sorted 0, 1, 3, 3, 3 -> ranks 0, 1, and (2 + 3 + 4) / 3 = 3 for the 3s
    assert es.ranks(np.array([3.0, 1.0, 3.0, 0.0, 3.0])).tolist() == [3.0, 1.0, 3.0, 0.0, 3.0]
    assert es.ranks(np.array([3.0, 1.0, 3.0, 0.0, 3.0]), "position").tolist() == [2, 1, 3, 0, 4]
    np.testing.assert_array_equal(es.centered_ranks(np.zeros(5)), np.zeros(5))


def test_pair_ranks_ties_get_their_average_rank():
    """Hero-like case: most pairs score F+ = F- = 0; they must all get the same weight."""
    pos = np.array([0.0, 0.0, 50.0, 0.0, 0.0])
    neg = np.array([0.0, 0.0, 0.0, 0.0, 25.0])
    # differences 0, 0, 50, 0, -25 -> ranks 2, 2, 4, 2, 0 -> /4 - 0.5 -> x2
    w = es.fitness_weights(pos, neg, "pair_ranks")
    np.testing.assert_allclose(w, [0.0, 0.0, 1.0, 0.0, -1.0])
    w_pos = es.fitness_weights(pos, neg, "pair_ranks", ties="position")
    np.testing.assert_allclose(w_pos, [-0.5, 0.0, 1.0, 0.5, -1.0])  # noise in order of j


@pytest.mark.parametrize("shaping", sorted(es.FITNESS_SHAPING))
@pytest.mark.parametrize("ties", ["average", "position"])
def test_every_shaping_is_invariant_to_the_order_of_pairs(shaping, ties):
    """Permuting the pairs permutes the weights (average ties: exactly; position: for distinct
    values), so nothing depends on which rank evaluated which pair."""
    rng = np.random.default_rng(5)
    pos, neg = rng.integers(0, 4, 30).astype(float), rng.integers(0, 4, 30).astype(float)
    if ties == "position":
        pos, neg = rng.normal(size=30), rng.normal(size=30)
    perm = rng.permutation(30)
    w = es.fitness_weights(pos, neg, shaping, ties)
    np.testing.assert_array_equal(es.fitness_weights(pos[perm], neg[perm], shaping, ties), w[perm])


@pytest.mark.parametrize("shaping", ["centered_ranks", "pair_ranks"])
def test_weights_are_antisymmetric_and_bounded(shaping):
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(size=50), rng.normal(size=50)
    w = es.fitness_weights(pos, neg, shaping)
    np.testing.assert_allclose(es.fitness_weights(neg, pos, shaping), -w)
    assert np.all(np.abs(w) <= 1.0 + 1e-12)
    assert np.all(np.sign(w[np.abs(pos - neg) > 0.5]) == np.sign((pos - neg)[np.abs(pos - neg) > 0.5]))


def test_pair_ranks_map_to_minus_one_one():
    w = es.fitness_weights(np.array([1.0, 5.0, 3.0]), np.zeros(3), "pair_ranks")
    np.testing.assert_allclose(w, [-1.0, 1.0, 0.0])


def test_weighted_noise_sum_matches_dense_product_and_any_split():
    table = make_table(10_000, noise_seed=1)
    rng = np.random.default_rng(1)
    dim, offsets, weights = 300, rng.integers(0, 10_000 - 300, 40), rng.normal(size=40)
    full = es.weighted_noise_sum(table, offsets, weights, 0, dim)
    dense = np.stack([table[o:o + dim] for o in offsets]).astype(np.float64)
    np.testing.assert_allclose(full, weights @ dense, rtol=1e-12, atol=1e-12)
    parts = [es.weighted_noise_sum(table, offsets, weights, lo, hi)
             for lo, hi in [(0, 7), (7, 150), (150, 300)]]
    assert np.array_equal(np.concatenate(parts), full)  # bitwise, whatever the split
    for block in (1, 7, 64, 10_000):  # and whatever the cache blocking
        assert np.array_equal(es.weighted_noise_sum(table, offsets, weights, 0, dim, block), full)
    # the same float64 ops in the same order as the plain loop over j
    plain = np.zeros(dim)
    for o, w in zip(offsets, weights):
        plain += table[o:o + dim] * np.float64(w)
    assert np.array_equal(plain, full)


def test_gradient_estimate_scaling():
    s = np.ones(3)
    np.testing.assert_allclose(es.gradient_estimate(s, 10, 0.5), s / 10)  # 2 N sigma
    np.testing.assert_allclose(es.gradient_estimate(s, 10, 0.5, divisor="pairs"), s / 5)
    openai = es.gradient_estimate(s, 10, 0.5, divide_by_sigma=False, divisor="episodes")
    np.testing.assert_allclose(openai, s / 20)


def test_lorenc_gradient_of_a_three_pair_example():
    """Their table holds sigma*eps and they divide sum_j w_j (sigma eps_j) by 2 N sigma^2:
    a 3-pair case by hand equals sum w eps / (2 N sigma)."""
    sigma = 0.02
    table = np.array([1.0, -2.0, 0.5, 3.0, -1.0], dtype=np.float32)
    offsets, dim = np.array([0, 2, 1]), 3  # eps_0 = (1,-2,.5), eps_1 = (.5,3,-1), eps_2 = (-2,.5,3)
    pos, neg = np.array([5.0, 1.0, 3.0]), np.array([2.0, 4.0, 3.0])
    w = es.fitness_weights(pos, neg, "pair_ranks")  # differences 3, -3, 0 -> 1, -1, 0
    np.testing.assert_allclose(w, [1.0, -1.0, 0.0])
    g = es.gradient_estimate(es.weighted_noise_sum(table, offsets, w, 0, dim), 3, sigma)
    by_hand = (np.array([1.0, -2.0, 0.5]) - np.array([0.5, 3.0, -1.0])) / (2 * 3 * sigma)
    np.testing.assert_allclose(g, by_hand, rtol=1e-12)
    scaled = sum(wj * sigma * table[o:o + dim].astype(np.float64) for wj, o in zip(w, offsets))
    np.testing.assert_allclose(g, scaled / (2 * 3 * sigma**2), rtol=1e-12)  # their form


def test_es_gradient_points_uphill_on_a_linear_function():
    """Mirrored ES with centred ranks recovers the direction of c for f(x) = c.x."""
    dim, n, sigma = 20, 2000, 0.1
    table = make_table(200_000, noise_seed=3)
    c = np.random.default_rng(2).normal(size=dim)
    theta = np.zeros(dim)
    offsets = np.random.default_rng(3).integers(0, table.size - dim, n)
    eps = np.stack([table[o:o + dim] for o in offsets])
    pos, neg = (theta + sigma * eps) @ c, (theta - sigma * eps) @ c
    w = es.fitness_weights(pos, neg, "centered_ranks")
    g = es.gradient_estimate(es.weighted_noise_sum(table, offsets, w, 0, dim), n, sigma)
    cos = g @ c / np.linalg.norm(g) / np.linalg.norm(c)
    assert cos > 0.9


def test_sgd_momentum_matches_openai_form():
    state = es.OptimizerState.zeros(2)
    g = np.array([1.0, -2.0])
    step, state = es.sgd_momentum_step(g, state, lr=0.1, momentum=0.9)
    np.testing.assert_allclose(step, 0.1 * 0.1 * g)
    step, state = es.sgd_momentum_step(g, state, lr=0.1, momentum=0.9)
    np.testing.assert_allclose(step, 0.1 * (0.9 * 0.1 * g + 0.1 * g))
    assert state.step == 2


def test_adam_matches_torch_adam_ascending():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    grads = rng.normal(size=(5, 6))
    p = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([p], lr=0.01, betas=(0.9, 0.999), eps=0.0, maximize=True)
    theta, state = np.zeros(6), es.OptimizerState.zeros(6)
    for g in grads:
        p.grad = torch.from_numpy(g.copy())
        opt.step()
        step, state = es.adam_step(g, state, lr=0.01, eps=0.0)
        theta = theta + step
    np.testing.assert_allclose(theta, p.detach().numpy(), rtol=1e-10)


def test_weight_decay_forms():
    theta = np.array([1.0, -2.0], dtype=np.float32)
    zero = np.zeros(2)
    cfg = ESConfig(population=1, sigma=1.0, lr=0.1, momentum=0.0, weight_decay=0.005)
    new, _ = es.es_update(theta, zero, es.OptimizerState.zeros(2), cfg)
    np.testing.assert_allclose(new, theta * 0.995, rtol=1e-6)
    cfg.weight_decay_mode = "l2"
    new, _ = es.es_update(theta, zero, es.OptimizerState.zeros(2), cfg)
    np.testing.assert_allclose(new, theta - 0.1 * 0.005 * theta, rtol=1e-6)
    cfg.weight_decay_mode = "none"
    new, _ = es.es_update(theta, zero, es.OptimizerState.zeros(2), cfg)
    assert np.array_equal(new, theta)


def test_es_update_keeps_float32_and_ascends():
    theta = np.zeros(3, dtype=np.float32)
    cfg = ESConfig(population=1, sigma=1.0, optimizer="adam", lr=0.01, weight_decay_mode="none")
    new, state = es.es_update(theta, np.array([1.0, -1.0, 0.0]), es.OptimizerState.zeros(3), cfg)
    assert new.dtype == np.float32 and new[0] > 0 > new[1] and new[2] == 0 and state.step == 1


def test_adaptive_episode_cap():
    assert es.adaptive_episode_cap(1000, None, 2.0) == 1000
    assert es.adaptive_episode_cap(1000, np.array([10, 30]), 2.0) == 40
    assert es.adaptive_episode_cap(1000, np.array([900, 900]), 2.0) == 1000
    assert es.adaptive_episode_cap(1000, np.array([10, 30]), 0.0) == 1000


def test_obs_stats_mean_std():
    stats = es.ObsStats.empty((2,), eps=1e-8)
    x = np.array([[1.0, 2.0], [3.0, 6.0]])
    stats.add(x.sum(0), (x**2).sum(0), 2)
    np.testing.assert_allclose(stats.mean, [2.0, 4.0], rtol=1e-6)
    np.testing.assert_allclose(stats.std(), [1.0, 2.0], rtol=1e-6)


def test_obs_stats_variance_floor():
    """Both references: std = sqrt(max(var, 1e-2)), so a (nearly) constant feature gets 0.1."""
    stats = es.ObsStats.empty((3,), eps=1e-8)
    x = np.array([[5.0, 0.0, 1.0], [5.0, 0.02, -1.0]])
    stats.add(x.sum(0), (x**2).sum(0), 2)
    # variances 0, 1e-4, 1
    np.testing.assert_allclose(stats.std(), [0.1, 0.1, 1.0], rtol=1e-6)
    np.testing.assert_allclose(stats.std(var_floor=1e-6)[1:], [0.01, 1.0], rtol=1e-4)
