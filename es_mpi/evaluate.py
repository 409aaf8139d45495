"""`python -m es_mpi.evaluate CHECKPOINT_OR_RUN_DIR`: run theta (no noise) for N episodes.

Prints the mean/std of the return and length. `--rtg v1,v2,...` repeats the evaluation for
each initial return-to-go of a Decision Transformer (Lorenc & Neruda's Table I) and prints one
row per value. `--video FILE.mp4` renders one episode (seed --seed, the first return-to-go)
headless with imageio. Episode i uses environment seed `--seed + i`, so the same command
prints the same numbers.

Headless rendering: MuJoCo needs an OpenGL backend. If MUJOCO_GL is unset this module sets it
to `egl` when an NVIDIA GPU is visible, else `osmesa` (software; Debian package libosmesa6).
Export MUJOCO_GL yourself to override.

Reads files only: never imports es_mpi.comm or mpi4py.
"""
from __future__ import annotations

import os  # noqa: F401

from .determinism import pin_cpu_kernels

pin_cpu_kernels()  # one thread and the same kernels as in training: same numbers

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from .config import ConfigError  # noqa: E402


def default_gl_backend() -> str:
    """egl with an NVIDIA GPU (hardware rendering), osmesa otherwise (CPU)."""
    return "egl" if Path("/dev/nvidia0").exists() else "osmesa"


@dataclass
class Checkpoint:
    path: Path
    theta: np.ndarray
    config_text: str
    iteration: int
    obs_stats: object  # es.ObsStats
    extras: dict  # arrays saved with the run (e.g. the VBN reference batch)


def read_checkpoint(path: str | Path) -> Checkpoint:
    """A checkpoint file as given (checksum verified), or the newest valid
    `checkpoints/ckpt_*.h5` of a run directory (corrupt ones are reported and skipped).
    Damaged files raise CheckpointError within seconds (a guarded read, es_mpi.h5safe)."""
    from .checkpoint import latest_valid_checkpoint, load_checkpoint

    path = Path(path)
    if path.is_dir():
        found = latest_valid_checkpoint(path, warn=lambda msg: print(msg, file=sys.stderr))
        if found is None:
            raise FileNotFoundError(f"{path}: no valid checkpoints/ckpt_*.h5 in this run "
                                    f"directory")
        state, config_text, path = found
    elif path.is_file():
        state, config_text = load_checkpoint(path, guard=True)  # damage: an error, no hang
    else:
        raise FileNotFoundError(f"{path}: no such checkpoint file or run directory")
    return Checkpoint(path, state.theta.astype(np.float32), config_text, state.iteration,
                      state.obs_stats, state.extras)


@dataclass
class Evaluation:
    target_return: float | None
    returns: np.ndarray
    lengths: np.ndarray


class Evaluator:
    """theta's policy in its environment, with the checkpoint's observation normalisation."""

    def __init__(self, ckpt: Checkpoint, render: bool = False, size: tuple[int, int] | None = None):
        from .config import loads
        from .envs import episode_limit, make_env
        from .envs_atari import is_atari
        from .policies.vbn import restore_vbn_reference
        from .rollout import make_normalizer
        from .runtime import build_policy

        self.cfg = cfg = loads(ckpt.config_text)
        env_cfg = cfg.env
        if render and size is not None and not is_atari(cfg.env.id):  # MuJoCo frame size
            env_cfg = dataclasses.replace(
                cfg.env, kwargs={**cfg.env.kwargs, "width": size[0], "height": size[1]})
        self.env = make_env(env_cfg, render_mode="rgb_array" if render else None)
        self.limit = episode_limit(self.env)
        self.policy = build_policy(cfg, self.env)  # one torch thread (run.torch_threads)
        if ckpt.theta.size != self.policy.num_params:
            raise ConfigError(f"{ckpt.path}: theta has {ckpt.theta.size} values, the policy of "
                             f"its config {self.policy.num_params}")
        self.policy.set_theta(ckpt.theta)
        restore_vbn_reference(self.policy, ckpt.extras)  # Atari encoders with VBN
        self.normalize = make_normalizer(cfg.env, ckpt.obs_stats)

    def run(self, episodes: int, seed: int, target_return: float | None = None,
            max_steps: int | None = None) -> Evaluation:
        res = run_episodes(self.env, self.policy, self.normalize, self.limit, episodes, seed,
                           target_return, max_steps)
        return Evaluation(target_return, np.array([r.ret for r in res]),
                          np.array([r.length for r in res]))

    def record(self, seed: int, target_return: float | None = None,
               max_steps: int | None = None) -> tuple[list[np.ndarray], float]:
        """One episode's rgb frames (after reset and after every step) and its return."""
        from .rollout import run_episode

        recorder = _FrameRecorder(self.env)
        cap = min(self.limit, max_steps or self.limit)
        res = run_episode(recorder, self.policy, seed, cap, self.normalize,
                          target_return=target_return, episode_seed=seed)
        return recorder.frames, res.ret


def run_episodes(env, policy, normalize, limit: int, episodes: int, seed: int,
                 target_return: float | None = None, max_steps: int | None = None) -> list:
    """Episodes i = 0..episodes-1 from reset(seed + i), capped at the env's `limit` or
    `max_steps` if smaller: rollout.EpisodeResult each. The policy's own randomness (dropout,
    sampled actions) is seeded by the episode seed too."""
    from .rollout import run_episode

    cap = min(limit, max_steps or limit)
    return [run_episode(env, policy, seed + i, cap, normalize, target_return=target_return,
                        episode_seed=seed + i) for i in range(episodes)]


class _FrameRecorder:
    """Env proxy that keeps env.render() after reset and after each step."""

    def __init__(self, env):
        self.env, self.frames = env, []

    def reset(self, **kwargs):
        out = self.env.reset(**kwargs)
        self.frames.append(self.env.render())
        return out

    def step(self, action):
        out = self.env.step(action)
        self.frames.append(self.env.render())
        return out


def write_video(path: str | Path, frames: list[np.ndarray], fps: int) -> None:
    import imageio.v2 as imageio

    with imageio.get_writer(str(path), fps=fps, codec="libx264", macro_block_size=1) as w:
        for frame in frames:
            w.append_data(np.asarray(frame, dtype=np.uint8))


def format_table(rows: list[Evaluation], episodes: int) -> str:
    head = (f"{'target return':>14}  {'episodes':>8}  {'return mean':>12}  {'return std':>10}  "
            f"{'length mean':>11}  {'length std':>10}")
    lines = [head, "-" * len(head)]
    for ev in rows:
        rtg = "policy" if ev.target_return is None else f"{ev.target_return:g}"
        lines.append(f"{rtg:>14}  {episodes:>8d}  {ev.returns.mean():12.2f}  "
                     f"{ev.returns.std():10.2f}  {ev.lengths.mean():11.1f}  "
                     f"{ev.lengths.std():10.1f}")
    return "\n".join(lines)


def parse_rtg(text: str | None) -> list[float | None]:
    if text is None:
        return [None]
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--rtg: expected comma-separated numbers, got {text!r}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m es_mpi.evaluate",
                                description=__doc__.splitlines()[0])
    p.add_argument("path", help="checkpoint .h5 file, or a run directory (newest checkpoint)")
    p.add_argument("--episodes", type=int, default=10, help="episodes per row (default 10)")
    p.add_argument("--seed", type=int, default=0, help="episode i uses env seed SEED+i")
    p.add_argument("--rtg", help="comma-separated initial returns-to-go (DT only), e.g. "
                                 "-1000,0,1000000")
    p.add_argument("--max-steps", type=int, help="cap on episode length (default: env limit)")
    p.add_argument("--video", help="write one rendered episode to this .mp4 file")
    p.add_argument("--video-size", default="480x480", help="WIDTHxHEIGHT of MuJoCo frames")
    p.add_argument("--fps", type=int, help="video frame rate (default: the env's render_fps)")
    return p.parse_args(_join_negative_rtg(sys.argv[1:] if argv is None else list(argv)))


def _join_negative_rtg(argv: list[str]) -> list[str]:
    """`--rtg -1000,0` -> `--rtg=-1000,0` (argparse would read -1000 as an option)."""
    out = []
    for arg in argv:
        if out and out[-1] == "--rtg" and arg.startswith("-"):
            out[-1] = f"--rtg={arg}"
        else:
            out.append(arg)
    return out


def recording_fps(rec: "Evaluator") -> int:
    """Real time: one recorded frame per agent step (ALE: frame_skip frames of a 60 Hz console;
    MuJoCo envs set render_fps to 1 / step duration)."""
    from .envs_atari import is_atari

    if is_atari(rec.cfg.env.id):
        return max(1, round(60 / rec.cfg.env.frame_skip))
    return int(rec.env.metadata.get("render_fps", 30))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.episodes < 1:
        raise SystemExit("--episodes: must be at least 1")
    rtgs = parse_rtg(args.rtg)
    if args.video:  # mujoco picks its GL backend when first imported
        os.environ.setdefault("MUJOCO_GL", default_gl_backend())
    from .checkpoint import CheckpointError

    try:
        ckpt = read_checkpoint(args.path)
    except (FileNotFoundError, CheckpointError) as exc:
        print(f"es_mpi.evaluate: {exc}", file=sys.stderr)
        return 2
    from .config import loads

    kind = loads(ckpt.config_text).policy.kind
    if args.rtg is not None and kind != "dt":
        print(f"es_mpi.evaluate: --rtg needs a Decision Transformer (policy.kind dt), this "
              f"checkpoint holds {kind!r}", file=sys.stderr)
        return 2
    try:
        ev = Evaluator(ckpt)
    except ConfigError as exc:  # its config names an env, size or setting that does not fit
        print(f"es_mpi.evaluate: {exc}", file=sys.stderr)
        return 2
    print(f"es_mpi.evaluate: {ckpt.path} (iteration {ckpt.iteration}), {ev.cfg.env.id}, "
          f"policy {kind} with {ev.policy.num_params:,} parameters", flush=True)
    rows = [ev.run(args.episodes, args.seed, rtg, args.max_steps) for rtg in rtgs]
    print(format_table(rows, args.episodes), flush=True)
    if args.video:
        width, height = (int(v) for v in args.video_size.lower().split("x"))
        rec = Evaluator(ckpt, render=True, size=(width, height))
        frames, ret = rec.record(args.seed, rtgs[0], args.max_steps)
        fps = args.fps or recording_fps(rec)
        write_video(args.video, frames, fps)
        rec.env.close()
        print(f"video: {args.video} ({len(frames)} frames at {fps} fps, return {ret:.2f}, "
              f"MUJOCO_GL={os.environ['MUJOCO_GL']})", flush=True)
    ev.env.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
