"""`python -m es_mpi.evaluate CHECKPOINT_OR_RUN_DIR`: run theta (no noise) for N episodes.

Prints the mean/std of the return and length. `--rtg v1,v2,...` repeats the evaluation for
each initial return-to-go of a Decision Transformer (Lorenc & Neruda's Table I) and prints one
row per value. `--video FILE.mp4` renders one episode (seed --seed, the first return-to-go)
headless with imageio. Episode i uses environment seed `--seed + i`, so the same command
prints the same numbers.

Headless rendering: MuJoCo needs an OpenGL backend. If MUJOCO_GL is unset this module tries
`egl` (Mesa's EGL renders on the CPU too; an NVIDIA driver's on the GPU), then `osmesa`, each
in a child process, and uses the first that renders; if none does it names the system
packages to install (Debian/Ubuntu: libegl1 and libgl1-mesa-dri, or libosmesa6). A MUJOCO_GL
you export is used as it is (and checked the same way). Atari needs no OpenGL.

Reads files only: never imports es_mpi.comm or mpi4py.
"""
from __future__ import annotations

import os

from .determinism import pin_cpu_kernels

pin_cpu_kernels()  # one thread and the same kernels as in training: same numbers

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from .config import ConfigError  # noqa: E402
from .outputs import check_writable, make_parent  # noqa: E402


GL_BACKENDS = ("egl", "osmesa")  # tried in this order when MUJOCO_GL is unset
GL_PACKAGES = {"egl": "libegl1 libgl1-mesa-dri", "osmesa": "libosmesa6"}  # Debian/Ubuntu
GL_PROBE_SECONDS = 60.0
_GL_PROBE = ("import mujoco\n"
             "m = mujoco.MjModel.from_xml_string('<mujoco><worldbody><geom size=\"1\"/>"
             "</worldbody></mujoco>')\n"
             "r = mujoco.Renderer(m, 16, 16)\n"
             "r.update_scene(mujoco.MjData(m))\n"
             "r.render()\n"
             "r.close()\n")


def probe_gl(backend: str) -> str | None:
    """None if MuJoCo renders offscreen with MUJOCO_GL=backend (tried in a child process:
    a failed backend can leave the process unable to load another), else why not."""
    import subprocess

    env = {**os.environ, "MUJOCO_GL": backend}
    env.pop("PYOPENGL_PLATFORM", None)  # mujoco sets it to match MUJOCO_GL
    try:
        proc = subprocess.run([sys.executable, "-c", _GL_PROBE], env=env, capture_output=True,
                              text=True, timeout=GL_PROBE_SECONDS)
    except subprocess.TimeoutExpired:
        return f"no frame within {GL_PROBE_SECONDS:g} s"
    if proc.returncode == 0:
        return None
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"exit status {proc.returncode}"


def choose_gl_backend(environ=os.environ) -> str:
    """The MUJOCO_GL to render with: the user's if set and working, else the first of
    GL_BACKENDS that works; ConfigError naming what to install when none does."""
    hint = (f"install one (Debian/Ubuntu: apt-get install {GL_PACKAGES['egl']} for EGL, or "
            f"apt-get install {GL_PACKAGES['osmesa']} for OSMesa)")
    user = environ.get("MUJOCO_GL")
    if user:
        why = probe_gl(user)
        if why is not None:
            raise ConfigError(f"--video: MUJOCO_GL={user} (set in your environment) cannot "
                              f"render here: {why}. Unset MUJOCO_GL to let es_mpi.evaluate pick "
                              f"a working backend, or {hint}")
        return user
    failures = []
    for backend in GL_BACKENDS:
        why = probe_gl(backend)
        if why is None:
            return backend
        failures.append(f"{backend}: {why}")
    raise ConfigError("--video: no OpenGL backend renders MuJoCo here ("
                      + "; ".join(failures) + f"); {hint}")


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
            max_steps: int | None = None, bar=None) -> Evaluation:
        """`bar` (optional, tqdm-like): updated once per finished episode."""
        res = run_episodes(self.env, self.policy, self.normalize, self.limit, episodes, seed,
                           target_return, max_steps, bar)
        return Evaluation(target_return, np.array([r.ret for r in res]),
                          np.array([r.length for r in res]))

    def record(self, seed: int, target_return: float | None = None,
               max_steps: int | None = None, bar=None) -> tuple[list[np.ndarray], float]:
        """One episode's rgb frames (after reset and after every step) and its return;
        `bar` (optional, tqdm-like) is updated once per frame."""
        from .rollout import run_episode

        recorder = _FrameRecorder(self.env, bar)
        cap = min(self.limit, max_steps or self.limit)
        res = run_episode(recorder, self.policy, seed, cap, self.normalize,
                          target_return=target_return, episode_seed=seed)
        return recorder.frames, res.ret


def run_episodes(env, policy, normalize, limit: int, episodes: int, seed: int,
                 target_return: float | None = None, max_steps: int | None = None,
                 bar=None) -> list:
    """Episodes i = 0..episodes-1 from reset(seed + i), capped at the env's `limit` or
    `max_steps` if smaller: rollout.EpisodeResult each. The policy's own randomness (dropout,
    sampled actions) is seeded by the episode seed too. `bar`: updated after each episode."""
    from .rollout import run_episode

    cap, out = min(limit, max_steps or limit), []
    for i in range(episodes):
        out.append(run_episode(env, policy, seed + i, cap, normalize,
                               target_return=target_return, episode_seed=seed + i))
        if bar is not None:
            bar.update(1)
    return out


class _FrameRecorder:
    """Env proxy that keeps env.render() after reset and after each step."""

    def __init__(self, env, bar=None):
        self.env, self.frames, self.bar = env, [], bar

    def keep(self) -> None:
        self.frames.append(self.env.render())
        if self.bar is not None:
            self.bar.update(1)

    def reset(self, **kwargs):
        out = self.env.reset(**kwargs)
        self.keep()
        return out

    def step(self, action):
        out = self.env.step(action)
        self.keep()
        return out


def write_video(path: str | Path, frames: list[np.ndarray], fps: int) -> None:
    from .extras import require

    imageio = require("imageio.v2", "tools", "--video")

    try:
        with imageio.get_writer(str(make_parent(path)), fps=fps, codec="libx264",
                                macro_block_size=1) as w:
            for frame in frames:
                w.append_data(np.asarray(frame, dtype=np.uint8))
    except BaseException:
        Path(path).unlink(missing_ok=True)  # no half-written video (a full disk, Ctrl-C)
        raise


def format_table(rows: list[Evaluation], episodes: int, default_target: float | None) -> str:
    """One row per evaluation; the `target return` column only for a policy that takes one
    (a DT: `default_target` is its configured target, used where a row has none)."""
    head = (f"{'episodes':>8}  {'return mean':>12}  {'return std':>10}  {'length mean':>11}  "
            f"{'length std':>10}")
    if default_target is not None:
        head = f"{'target return':>14}  {head}"
    lines = [head, "-" * len(head)]
    for ev in rows:
        line = (f"{episodes:>8d}  {ev.returns.mean():12.2f}  {ev.returns.std():10.2f}  "
                f"{ev.lengths.mean():11.1f}  {ev.lengths.std():10.1f}")
        if default_target is not None:
            target = default_target if ev.target_return is None else ev.target_return
            line = f"{target:>14g}  {line}"
        lines.append(line)
    return "\n".join(lines)


TABLE_COLUMNS = ("target return", "episodes", "return mean", "return std", "length mean",
                 "length std")


def parse_table(text: str) -> list[dict[str, float]]:
    """The rows of format_table's table in `text` (e.g. es_mpi.evaluate's output), as
    {column: value}: for scripts and tests, whichever columns the policy has."""
    lines = text.splitlines()
    for i, line in enumerate(lines[:-1]):
        if "return mean" in line and set(lines[i + 1]) == {"-"}:
            head = [c for c in TABLE_COLUMNS if c in line]
            return [dict(zip(head, map(float, row.split()))) for row in lines[i + 2:]
                    if len(row.split()) == len(head)]
    raise ValueError("no es_mpi.evaluate table in the text")


def parse_rtg(text: str | None) -> list[float | None]:
    if text is None:
        return [None]
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--rtg: expected comma-separated numbers, got {text!r}") from None
    if not values or not all(np.isfinite(values)):
        raise ConfigError(f"--rtg: expected comma-separated finite numbers, got {text!r}")
    return values


def parse_size(text: str) -> tuple[int, int]:
    """`WIDTHxHEIGHT` -> (width, height), both positive; ConfigError otherwise."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(f"--video-size: expected WIDTHxHEIGHT in pixels, e.g. 640x480, "
                          f"got {text!r}")
    return int(parts[0]), int(parts[1])


VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi")  # containers ffmpeg writes H.264 into


def check_args(args) -> list[float | None]:
    """The command line checked before any work (ConfigError naming the option): the
    returns-to-go to evaluate at."""
    for option, value, least in (("--episodes", args.episodes, 1), ("--seed", args.seed, 0),
                                 ("--max-steps", args.max_steps, 1), ("--fps", args.fps, 1)):
        if value is not None and value < least:
            raise ConfigError(f"{option}: must be at least {least}, got {value}")
    rtgs = parse_rtg(args.rtg)
    args.size = parse_size(args.video_size)
    if args.video:
        from .extras import require

        for module in ("imageio", "imageio_ffmpeg"):
            require(module, "tools", "--video")
        args.video = check_writable("--video", args.video, VIDEO_SUFFIXES)
    return rtgs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m es_mpi.evaluate",
                                description=__doc__.splitlines()[0])
    p.add_argument("path", help="checkpoint .h5 file, or a run directory (newest checkpoint)")
    p.add_argument("--episodes", type=int, default=10, help="episodes per row (default 10)")
    p.add_argument("--seed", type=int, default=0, help="episode i uses env seed SEED+i")
    p.add_argument("--rtg", help="comma-separated initial returns-to-go (DT only), e.g. "
                                 "-1000,0,1000000")
    p.add_argument("--max-steps", type=int, help="cap on episode length (default: env limit)")
    p.add_argument("--video", help="write one rendered episode to this .mp4 file (needs the "
                                   "'tools' extra)")
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


def prepare(args) -> tuple[Checkpoint, Evaluator, list[float | None]]:
    """Everything that can fail on bad input, before any episode: ConfigError."""
    from .checkpoint import CheckpointError
    from .config import loads
    from .envs_atari import is_atari

    rtgs = check_args(args)
    try:
        ckpt = read_checkpoint(args.path)
    except (FileNotFoundError, CheckpointError) as exc:
        raise ConfigError(str(exc)) from None
    cfg = loads(ckpt.config_text)
    if args.rtg is not None and cfg.policy.kind != "dt":
        raise ConfigError(f"--rtg needs a Decision Transformer (policy.kind dt), this "
                          f"checkpoint holds {cfg.policy.kind!r}")
    if args.video and not is_atari(cfg.env.id):  # mujoco picks its backend when imported
        os.environ["MUJOCO_GL"] = choose_gl_backend()
    return ckpt, Evaluator(ckpt), rtgs  # ConfigError: a config or theta that does not fit


def record_video(ckpt: Checkpoint, args, target_return: float | None) -> str:
    """Render one episode (seed --seed) to --video; the summary line."""
    from .progress import progress

    rec = Evaluator(ckpt, render=True, size=args.size)
    bar = progress(min(rec.limit, args.max_steps or rec.limit) + 1, "video", "frames")
    frames, ret = rec.record(args.seed, target_return, args.max_steps, bar)
    bar.close()
    fps = args.fps or recording_fps(rec)
    write_video(args.video, frames, fps)
    rec.env.close()
    backend = f", MUJOCO_GL={os.environ['MUJOCO_GL']}" if "MUJOCO_GL" in os.environ else ""
    return f"video: {args.video} ({len(frames)} frames at {fps} fps, return {ret:.2f}{backend})"


def main(argv: list[str] | None = None) -> int:
    from .launch import run_tool

    return run_tool(evaluate_command, parse_args(argv))


def evaluate_command(args) -> int:
    """Check everything, run the episodes, print the table; record the video."""
    from .progress import progress

    ckpt, ev, rtgs = prepare(args)
    policy = ev.cfg.policy
    print(f"es_mpi.evaluate: {ckpt.path} (iteration {ckpt.iteration}), {ev.cfg.env.id}, "
          f"policy {policy.kind} with {ev.policy.num_params:,} parameters", flush=True)
    bar = progress(args.episodes * len(rtgs), "evaluate", "episodes")
    rows = [ev.run(args.episodes, args.seed, rtg, args.max_steps, bar) for rtg in rtgs]
    bar.close()
    default_target = policy.target_return if policy.kind == "dt" else None
    print(format_table(rows, args.episodes, default_target), flush=True)
    if args.video:
        print(record_video(ckpt, args, rtgs[0]), flush=True)
    ev.env.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
