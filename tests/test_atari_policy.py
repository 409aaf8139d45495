"""Nature-DQN policy and virtual batch normalisation."""
import gymnasium as gym
import numpy as np
import pytest
import torch

from es_mpi.config import PolicyConfig
from es_mpi.policies import make_policy
from es_mpi.policies.vbn import VirtualBatchNorm, set_vbn_reference, uses_vbn

OBS = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
ACT = gym.spaces.Discrete(18)


def cnn(vbn: bool, seed: int = 0):
    return make_policy(PolicyConfig(kind="cnn", vbn=vbn), OBS, ACT, seed)


def frames(n: int, seed: int) -> np.ndarray:
    """Blocky random frames (not pure noise, so conv features vary across the batch)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, 4, 12, 12)).astype(np.uint8)
    return np.ascontiguousarray(small.repeat(7, axis=2).repeat(7, axis=3))


def test_cnn_parameter_counts_and_action():
    plain, with_vbn = cnn(False), cnn(True)
    assert plain.num_params == 1_693_362  # Nature DQN on 18 actions
    assert with_vbn.num_params == 1_694_706  # + VBN scale and shift per channel/feature
    assert not uses_vbn(plain) and set_vbn_reference(plain, frames(4, 0)) == 0
    a = plain.act(frames(1, 1)[0])  # no reference needed without VBN
    assert isinstance(a, int) and 0 <= a < 18
    assert np.array_equal(cnn(False).get_theta(), plain.get_theta())  # theta from the seed
    x = torch.from_numpy(frames(2, 1))  # the per-step path reads the live (flat) parameters
    torch.testing.assert_close(plain.encoder(x), plain.encoder._forward(x), rtol=0, atol=0)
    before = plain(x)
    plain.set_theta(plain.get_theta() * np.float32(2))
    assert not torch.equal(plain(x), before)


def test_vbn_needs_a_reference_batch_and_image_observations():
    with pytest.raises(RuntimeError, match="reference batch"):
        cnn(True).act(frames(1, 1)[0])
    box = gym.spaces.Box(-1, 1, (8,), np.float32)
    with pytest.raises(ValueError, match="policy.vbn"):
        make_policy(PolicyConfig(kind="mlp", vbn=True), box, ACT, 0)


def test_statistics_come_from_the_reference_batch():
    policy, ref = cnn(True), frames(32, 2)
    set_vbn_reference(policy, ref)
    policy.act(ref[0])  # computes the statistics
    enc = policy.encoder
    first_conv, first_vbn = enc.convs[0], enc.convs[1]
    assert isinstance(first_vbn, VirtualBatchNorm)
    pre = first_conv(torch.from_numpy(ref).float() / 255)
    expect = torch.nn.functional.batch_norm(pre, None, None, training=True, eps=1e-5)
    torch.testing.assert_close(first_vbn(pre), expect, rtol=1e-4, atol=1e-4)
    out = first_vbn(pre)  # scale 1, shift 0: zero mean and unit variance per channel
    torch.testing.assert_close(out.mean((0, 2, 3)), torch.zeros(32), atol=1e-4, rtol=0)
    # the per-step path (VBN folded into the layers) computes the same as layer by layer
    x = torch.from_numpy(frames(3, 3))
    torch.testing.assert_close(enc(x), enc._forward(x), rtol=1e-4, atol=1e-4)
    # the features of one frame do not depend on what else is in its batch
    x = torch.from_numpy(frames(3, 3))
    torch.testing.assert_close(enc(x)[:1], enc(x[:1]))
    # another reference batch gives other statistics, so other features
    other = cnn(True)
    set_vbn_reference(other, frames(32, 4))
    assert not torch.allclose(other.encoder(x), enc(x))


def test_statistics_are_recomputed_after_theta_changes():
    ref, x = frames(16, 5), torch.from_numpy(frames(2, 6))
    policy = cnn(True)
    set_vbn_reference(policy, ref)
    theta = policy.get_theta()
    before = policy(x).clone()
    eps = np.random.default_rng(0).standard_normal(theta.size).astype(np.float32)
    policy.set_perturbed(theta, eps, 0.05)
    fresh = cnn(True)  # a new module whose first statistics are computed at the same theta
    fresh.set_theta(theta + np.float32(0.05) * eps)
    set_vbn_reference(fresh, ref)
    after = policy(x)
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, fresh(x), rtol=0, atol=0)
    policy.set_theta(theta)
    torch.testing.assert_close(policy(x), before, rtol=0, atol=0)


def test_reference_batch_costs_one_forward_per_theta_change(monkeypatch):
    policy = cnn(True)
    set_vbn_reference(policy, frames(8, 7))
    calls = []
    original = policy.encoder.refresh
    monkeypatch.setattr(policy.encoder, "refresh", lambda: (calls.append(1), original()))
    obs = frames(1, 8)[0]
    for _ in range(5):
        policy.act(obs)
    policy.set_theta(policy.get_theta())
    for _ in range(5):
        policy.act(obs)
    assert len(calls) == 2


def test_restore_from_checkpoint_extras():
    from es_mpi.policies.vbn import restore_vbn_reference
    ref, x = frames(8, 9), torch.from_numpy(frames(1, 10))
    a, b = cnn(True), cnn(True)
    set_vbn_reference(a, ref)
    assert restore_vbn_reference(b, {"vbn_reference": ref})
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="no extras/vbn_reference"):
        restore_vbn_reference(cnn(True), {})
    assert not restore_vbn_reference(cnn(False), {})
