"""The ALE path: the paper's preprocessing facts, checked against the bare emulator."""
import gymnasium as gym
import numpy as np
import pytest

from es_mpi.config import ConfigError, EnvConfig, load_job
from es_mpi.envs import episode_limit, make_env
from es_mpi.envs_atari import AreaResize, area_weights, random_policy_observations


def hero(**kw) -> gym.Env:
    """Hero with 1..30 no-op starts (not the paper's setting, but it exercises the wrapper)."""
    return make_env(EnvConfig(id="ALE/Hero-v5", normalize_obs=False, **{"noop_max": 30, **kw}))


def test_observation_and_action_spaces():
    env = hero()
    obs, _ = env.reset(seed=0)
    assert obs.shape == (4, 84, 84) and obs.dtype == np.uint8
    assert env.observation_space.shape == (4, 84, 84)
    assert env.action_space == gym.spaces.Discrete(18)
    assert episode_limit(env) == 108_000 // 4
    # after reset: three zero frames, then the first frame (Lorenc & Neruda's wrapper)
    assert not obs[:3].any() and obs[-1].any()
    repeat, _ = hero(frame_stack_reset="repeat").reset(seed=0)
    assert all(np.array_equal(repeat[k], obs[-1]) for k in range(4))  # gymnasium's padding
    obs2, *_ = env.step(0)
    assert np.array_equal(obs2[:3], obs[1:])  # the stack shifts by one frame, oldest first


def _first_reward(env) -> tuple[int, float]:
    """Fly down and blast the first wall (a down-heavy random policy does it in ~200 steps)."""
    rng = np.random.default_rng(2)
    env.reset(seed=0)
    for t in range(400):
        a = int(rng.choice([5, 3, 4, 13, 1, 8, 9], p=[.4, .15, .15, .1, .1, .05, .05]))
        _, r, term, trunc, _ = env.step(a)
        if r or term or trunc:
            return t, r
    return -1, 0.0


def test_no_sticky_actions_and_no_reward_clipping_by_default():
    env = hero()
    assert env.unwrapped.ale.getFloat("repeat_action_probability") == 0.0
    step, reward = _first_reward(env)
    assert step > 0 and reward == 75.0  # the wall's score, unclipped
    assert _first_reward(hero(clip_rewards=True)) == (step, 1.0)


def test_frame_cap_and_frame_skip():
    env = hero(max_frames=400)
    assert episode_limit(env) == 100
    assert episode_limit(hero(max_frames=400, max_episode_steps=50)) == 50
    env.reset(seed=3)
    ale = env.unwrapped.ale
    start = ale.getEpisodeFrameNumber()  # the no-op frames count toward the cap
    assert 1 <= start <= 30
    env.step(0)
    assert ale.getEpisodeFrameNumber() == start + 4
    steps, trunc = 1, False
    while not trunc:
        _, _, term, trunc, _ = env.step(5)
        assert not term
        steps += 1
    assert ale.getEpisodeFrameNumber() == 400
    assert steps == -(-(400 - start) // 4)


def test_matches_the_bare_emulator():
    """No-op count from the reset seed, 4-frame skip, max over the last two frames, area resize."""
    env = hero()
    bare = gym.make("ALE/Hero-v5", frameskip=1, repeat_action_probability=0.0,
                    max_num_frames_per_episode=108_000, disable_env_checker=True)
    ale = bare.unwrapped.ale
    resize = AreaResize((210, 160), 84)
    actions = np.random.default_rng(7).integers(0, 18, 60)
    for seed in (11, 12):
        obs, _ = env.reset(seed=seed)
        bare.reset(seed=seed)
        for _ in range(int(bare.unwrapped.np_random.integers(1, 31))):
            ale.act(0)
        assert np.array_equal(obs[-1], resize(ale.getScreenGrayscale()))
        for a in actions:
            obs, r, *_ = env.step(a)
            total = 0.0
            screens = []
            for _ in range(4):
                total += ale.act(bare.unwrapped._action_set[a])
                screens.append(ale.getScreenGrayscale())
            assert r == total
            assert np.array_equal(obs[-1], resize(np.maximum(screens[-2], screens[-1])))


# noop_max 0 is the paper's setting: the first observation then comes from no emulated frame,
# so a reset by snapshot must not show the screen the previous episode left behind
@pytest.mark.parametrize("noop_max", [30, 0])
def test_reset_is_deterministic_and_snapshot_equals_rom_reload(noop_max):
    fast, slow = hero(noop_max=noop_max), hero(noop_max=noop_max)
    slow.fast_reset = False  # reloads the ROM at every seeded reset, as AtariEnv.reset does
    actions = np.random.default_rng(1).integers(0, 18, 150)

    def trajectory(env, seed):
        frames = [env.reset(seed=seed)[0]]
        for a in actions:
            obs, r, term, trunc, _ = env.step(a)
            frames.append(obs)
            if term or trunc:
                break
        return np.stack(frames)

    fast.reset(seed=99)  # the snapshot comes from another seed's reset
    a1 = trajectory(fast, 5)
    trajectory(fast, 6)  # something else in between
    assert np.array_equal(trajectory(fast, 5), a1)
    assert np.array_equal(trajectory(slow, 5), a1)
    assert np.array_equal(trajectory(slow, 6), trajectory(fast, 6))
    if not noop_max:
        return
    noop_counts = set()
    for seed in range(8):
        fast.reset(seed=seed)
        noop_counts.add(fast.unwrapped.ale.getEpisodeFrameNumber())
    assert len(noop_counts) > 1  # no-op starts vary with the seed


def test_area_resize_is_exact():
    w = area_weights(210, 84)
    assert np.all(w.sum(axis=1) == 210)
    frame = np.random.default_rng(0).integers(0, 256, (210, 160)).astype(np.uint8)
    acc = area_weights(210, 84) @ frame.astype(np.int64) @ area_weights(160, 84).T
    expected = (acc + 210 * 160 // 2) // (210 * 160)
    assert np.array_equal(AreaResize((210, 160), 84)(frame), expected.astype(np.uint8))
    # an integer factor is a plain block mean
    small = np.random.default_rng(1).integers(0, 256, (168, 168)).astype(np.uint8)
    block = small.reshape(84, 2, 84, 2).astype(np.int64).sum(axis=(1, 3))
    assert np.array_equal(AreaResize((168, 168), 84)(small), ((block + 2) // 4).astype(np.uint8))
    assert np.all(AreaResize((210, 160), 84)(np.full((210, 160), 255, np.uint8)) == 255)


def test_render_rgb_array_for_videos():
    env = make_env(EnvConfig(id="ALE/Hero-v5", normalize_obs=False), render_mode="rgb_array")
    env.reset(seed=0)
    env.step(0)
    frame = env.render()
    assert frame.shape == (210, 160, 3) and frame.dtype == np.uint8


def test_random_policy_observations_depend_on_the_seed_only():
    a = random_policy_observations(hero(max_frames=400), 3, 12)
    b = random_policy_observations(hero(max_frames=400), 3, 12)
    c = random_policy_observations(hero(max_frames=400), 4, 12)
    assert a.shape == (12, 4, 84, 84) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_config_keys_and_refusals(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("env: {id: ALE/Hero-v5}\nes: {population: 2, sigma: 0.02}\n"
                   "run: {seed: 0, iterations: 1, dir: x}\n")
    cfg = load_job(job)  # per-pixel running normalisation is allowed (Lorenc's Atari input)
    assert cfg.env.normalize_obs
    with pytest.raises(ConfigError, match="policy.vbn"):  # one normalisation or the other
        load_job(job, ["policy.vbn=true"])
    cfg = load_job(job, ["env.normalize_obs=false"])
    # the defaults are Lorenc & Neruda's: no no-ops, no sticky actions, zeros in the stack
    assert (cfg.env.frame_skip, cfg.env.noop_max, cfg.env.frame_stack, cfg.env.screen_size,
            cfg.env.repeat_action_probability, cfg.env.max_frames, cfg.env.clip_rewards,
            cfg.env.terminal_on_life_loss, cfg.env.frame_stack_reset) == (
                4, 0, 4, 84, 0.0, 108_000, False, False, "zeros")
    with pytest.raises(ConfigError, match="env.repeat_action_probability"):
        load_job(job, ["env.normalize_obs=false", "env.repeat_action_probability=1.5"])
    with pytest.raises(ConfigError, match="env.frame_skip"):
        load_job(job, ["env.normalize_obs=false", "env.frame_skip=0"])
    for name in ("atari_hero.yaml", "atari_hero_cnn.yaml"):
        text = (__import__("pathlib").Path(__file__).parents[1] / "jobs" / name).read_text()
        assert "population: 40000" in text and "iterations: 60" in text
    assert load_job(__import__("pathlib").Path(__file__).parents[1]
                    / "jobs/atari_hero_cnn.yaml").es.population == 40000


def test_unknown_ale_id_is_a_config_error():
    from es_mpi.config import ConfigError, EnvConfig
    from es_mpi.envs import make_env
    with pytest.raises(ConfigError, match="env.id: cannot make environment 'ALE/Heroo-v5'"):
        make_env(EnvConfig(id="ALE/Heroo-v5", normalize_obs=False))
