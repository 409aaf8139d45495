"""Predict iteration seconds and idle share at 16 ... 1,440 ranks for the shipped paper jobs.

    python bench/scale_model.py checkpoints --out /tmp/scale_ckpt          # short real runs
    mpiexec -n 2 python bench/scale_model.py measure --checkpoints /tmp/scale_ckpt \
        --out docs/scale_model_inputs.json                                 # measured inputs
    mpiexec -n K python bench/scale_model.py check                         # model vs real, K ranks
    python bench/scale_model.py predict --inputs docs/scale_model_inputs.json \
        --plot docs/scale_model.png                                        # the prediction

The model (es_mpi/scale_model.py) takes only measured inputs: per job, the training path's
per-episode and per-step seconds (the env's step as the rollouts call it, policy.act by step
index), the update's seconds per
coordinate per eps and the node's memory bandwidth, the plan and exchange work, rank 0's writes;
the episode lengths of a real run (a checkpoint's prev_lengths); the collectives' latency and
bandwidth between this machine's ranks and the work counter's fetch round trip and service
time. What one machine cannot measure (the network between nodes) is an assumption given on
the command line (--inter-*). `measure` runs on every rank at once, so the costs are those of a
full node; measure with as many ranks as the node has cores.

`check` measures the same inputs at K ranks, runs real iterations of shrunk jobs
(bench/paper_jobs.py) under dynamic + world_split and static + every_rank, and predicts each
iteration from its own episode lengths: predicted vs measured iteration seconds.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from es_mpi.determinism import pin_cpu_kernels  # noqa: E402

pin_cpu_kernels()  # as es_mpi.run: one thread per rank, the same CPU kernels

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pickle  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from es_mpi import scale_model as sm  # noqa: E402
from paper_jobs import PAPER_JOBS, SMALL_TABLE, load, shrunk  # noqa: E402

RANKS = (16, 32, 64, 128, 300, 512, 1024, 1440)
DEFAULT = ("dynamic", "world_split")  # run.assignment, run.update as shipped
VARIANTS = (DEFAULT, ("dynamic", "node_split"), ("dynamic", "every_rank"),
            ("static", "world_split"), ("static", "every_rank"))
CHECK_VARIANTS = (DEFAULT, ("static", "every_rank"))
PROFILE_HEAD = 64  # policy steps timed one by one; later steps share one mean (policy_tail)
PROFILE_STEPS = 256  # steps of the long episode that times the policy by step index
EPISODE_STEP_CAP = 200  # env-cost episodes stop here (an Atari episode runs thousands)
MEASURE_TABLE = 64_000_000  # float32 values (256 MB) in a node-shared window: beyond any cache
NOISE_SUM_WORK = 2e8  # coordinates x eps per timing of the noise sum (~0.2 s)
# short real runs that make the checkpoints: job -> overrides (early training, ~1 min each)
CHECKPOINT_RUNS = {
    "humanoid_mlp": ["es.population=200", "run.iterations=5"],
    "humanoid_dt": ["es.population=100", "run.iterations=5"],
    "humanoid_openai": ["es.population=200", "run.iterations=5"],
    "atari_hero": ["es.population=8", "es.eval_episodes=2", "run.iterations=2"],
}


def rank0_print(comm, *args) -> None:
    if comm is None or comm.Get_rank() == 0:
        print(*args, flush=True)


# ----------------------------------------------------------------------------- episode costs
def _perturb(policy, theta, table, rng, sigma: float) -> None:
    off = int(rng.integers(0, table.size - theta.size + 1))
    policy.set_perturbed(theta, table[off: off + theta.size], sigma)


def episode_setup_and_env(cfg, env, policy, table, seconds: float, seed: int) -> tuple:
    """Mean seconds of an episode's set-up (theta + sigma eps into the policy, the episode's
    seed, env.reset, policy.reset) and of one env.step, over perturbed episodes run as the
    training path runs them (capped at EPISODE_STEP_CAP steps)."""
    from es_mpi.envs import lean_step
    from es_mpi.es import ObsStats
    from es_mpi.noise import TRAIN_EPISODE, episode_seed
    from es_mpi.rollout import make_normalizer

    theta, rng = policy.get_theta(), np.random.default_rng(seed)
    normalize = make_normalizer(cfg.env, ObsStats.empty(env.observation_space.shape))
    step_fn, buf = lean_step(env).step, np.empty(env.observation_space.shape, np.float32)
    setup = env_s = 0.0
    steps = episodes = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or episodes < 3:
        t0 = time.perf_counter()
        _perturb(policy, theta, table, rng, cfg.es.sigma)
        key = episode_seed(cfg.run.seed, 0, TRAIN_EPISODE, episodes, 0)
        obs, _ = env.reset(seed=seed + episodes)
        policy.reset(None, seed=key)
        setup += time.perf_counter() - t0
        for _ in range(EPISODE_STEP_CAP):
            action = policy.act(normalize(obs, buf))
            t1 = time.perf_counter()
            obs, reward, term, trunc, _ = step_fn(action)
            env_s += time.perf_counter() - t1
            policy.observe(float(reward))
            steps += 1
            if term or trunc:
                break
        episodes += 1
    policy.set_theta(theta)
    return setup / episodes, env_s / steps


def policy_profile(cfg, env, policy, table, steps: int, seed: int) -> np.ndarray:
    """Seconds of normalise + act (+ action noise) + observe at each step t of one episode of
    `steps` policy steps (env.step between them, the env reset under it when it ends)."""
    from es_mpi.envs import lean_step
    from es_mpi.es import ObsStats
    from es_mpi.rollout import make_normalizer

    theta, rng = policy.get_theta(), np.random.default_rng(seed)
    normalize = make_normalizer(cfg.env, ObsStats.empty(env.observation_space.shape))
    noise_std = np.float32(cfg.policy.action_noise_std)
    _perturb(policy, theta, table, rng, cfg.es.sigma)
    policy.reset(None, seed=seed)
    obs, _ = env.reset(seed=seed)
    step_fn, buf = lean_step(env).step, np.empty(env.observation_space.shape, np.float32)
    out = np.empty(steps)
    for t in range(steps):
        t0 = time.perf_counter()
        action = policy.act(normalize(obs, buf))
        if noise_std > 0:
            action = action + rng.standard_normal(np.shape(action), dtype=np.float32) * noise_std
        t1 = time.perf_counter()
        obs, reward, term, trunc, _ = step_fn(action)
        t2 = time.perf_counter()
        policy.observe(float(reward))
        out[t] = (t1 - t0) + (time.perf_counter() - t2)
        if term or trunc:
            obs, _ = env.reset(seed=seed + t + 1)
    policy.set_theta(theta)
    return out


def measure_episode_cost(cfg, env, policy, table, seconds: float, seed: int) -> sm.EpisodeCost:
    from es_mpi.envs import episode_limit

    setup, env_step = episode_setup_and_env(cfg, env, policy, table, seconds, seed)
    prof = policy_profile(cfg, env, policy, table, min(PROFILE_STEPS, episode_limit(env)), seed)
    head = prof[:PROFILE_HEAD]
    tail = float(prof[PROFILE_HEAD:].mean()) if prof.size > PROFILE_HEAD else float(head[-1])
    return sm.EpisodeCost(setup, env_step, tuple(float(x) for x in head), tail)


def median_episode_cost(costs: list[sm.EpisodeCost]) -> sm.EpisodeCost:
    """The median of the ranks' and rounds' measurements (each rank measured while the others
    did too; the median ignores a round that the machine's other work slowed down)."""
    return sm.EpisodeCost(float(np.median([c.fixed for c in costs])),
                          float(np.median([c.env_step for c in costs])),
                          tuple(np.median([c.policy_head for c in costs], axis=0).tolist()),
                          float(np.median([c.policy_tail for c in costs])))


# ----------------------------------------------------------------------------- other costs
def best_of(fn, repeats: int = 3) -> float:
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def cold(fn, repeats: int = 3) -> float:
    """Median seconds of fn() on memory fresh from the OS, as in a run: between two updates
    the episodes run, glibc hands the freed arrays back, and each new d-sized array
    page-faults in again (at the Atari DT's d that is most of the optimiser step's time)."""
    import ctypes
    import ctypes.util

    trim = getattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim", None)
    times = []
    for _ in range(repeats):
        if trim is not None:
            trim(0)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure_update_cost(comm, table, cfg, dim: int, bandwidth: float) -> sm.UpdateCost:
    """Noise sum per coordinate per eps (all ranks at once, the slowest counts), shaping per
    pair and the optimiser step per coordinate; `bandwidth`: the node's (measure_fabric)."""
    from es_mpi import es
    from update import timed  # bench/update.py

    rng = np.random.default_rng(0)
    n = max(4, int(NOISE_SUM_WORK / dim))
    offsets = rng.integers(0, table.size - dim + 1, size=n)
    w = rng.normal(size=n)
    noise_sum = min(timed(comm, lambda: es.weighted_noise_sum(table, offsets, w, 0, dim))[0]
                    for _ in range(2))
    pairs = cfg.es.population
    pos, neg = rng.normal(size=pairs), rng.normal(size=pairs)
    shaping = best_of(lambda: es.fitness_weights(pos, neg, cfg.es.fitness_shaping,
                                                 cfg.es.tie_break))
    total = rng.normal(size=dim)
    theta, opt = np.zeros(dim, np.float32), es.OptimizerState.zeros(dim)
    step = cold(lambda: np.linalg.norm(es.es_update(theta, es.gradient_estimate(
        total, pairs, cfg.es.sigma, cfg.es.divide_by_sigma, cfg.es.grad_divisor), opt,
        cfg.es)[0]))
    return sm.UpdateCost(noise_sum / (n * dim), bandwidth, shaping / pairs,
                         step / dim, cold(total.copy) / dim)


def measure_plan_exchange(cfg, dim: int, obs_space) -> tuple[float, float]:
    """Plan seconds per pair (the iteration's draws) and the exchange's local work per item
    (sort the gathered rows, add the recorded observation sums), at the job's full size."""
    from es_mpi import comm as mpi
    from es_mpi.es import ObsStats
    from es_mpi.iteration import gather_obs_stats
    from es_mpi.noise import iteration_draws
    from es_mpi.rollout import EpisodeResult

    from es_mpi.iteration import n_eval_items

    pairs, n_eval = cfg.es.population, n_eval_items(cfg)
    prob = cfg.env.obs_stat_prob if cfg.env.normalize_obs else 0.0
    plan = best_of(lambda: iteration_draws(cfg.run.seed, 1, pairs, cfg.es.noise_table_size, dim,
                                           prob, n_eval, cfg.es.env_seeds))
    items = n_eval + 2 * pairs
    rows = np.zeros((items, 3))
    rows[:, 0] = np.random.default_rng(0).permutation(items)
    acc = np.int64 if np.issubdtype(obs_space.dtype, np.integer) else np.float64
    res = EpisodeResult(0.0, 10, np.ones(obs_space.shape, acc), np.ones(obs_space.shape, acc), 10)
    recorded = [(2 * k, res) for k in range(int(round(prob * 2 * pairs)))]
    self_comm = mpi.MPI.COMM_SELF
    exchange = best_of(lambda: (mpi.gather_by_key(self_comm, rows, items), gather_obs_stats(
        self_comm, recorded, obs_space, ObsStats.empty(obs_space.shape))))
    return plan / pairs, exchange / items


def measure_writes(cfg, dim: int, obs_shape) -> tuple[float, float]:
    """Rank 0's seconds for one results.h5 row and one checkpoint at the job's size."""
    from es_mpi.checkpoint import TrainState, save_checkpoint
    from es_mpi.es import ObsStats, OptimizerState
    from es_mpi.results import COLUMNS, ResultsWriter

    with tempfile.TemporaryDirectory() as tmp:
        writer = ResultsWriter(Path(tmp) / "results.h5")
        row = {name: 0 for name in COLUMNS}
        t0 = time.perf_counter()
        for i in range(5):
            writer.append(row | {"iteration": i})
        write_row = (time.perf_counter() - t0) / 5
        rows = writer.rows()
        writer.close()
        state = TrainState(5, np.zeros(dim, np.float32), OptimizerState.zeros(dim),
                           ObsStats.empty(obs_shape), np.zeros(2 * cfg.es.population, np.int64),
                           results=rows)
        ckpt = best_of(lambda: save_checkpoint(Path(tmp) / "ckpt.h5", state, cfg.to_yaml()), 2)
    return write_row, ckpt


# ----------------------------------------------------------------------------- fabric
def measure_fabric(comm, table: np.ndarray) -> dict:
    """The machine: its read bandwidth from the node-shared table with every rank streaming
    (bench/update.py's read, median of 7), collective latency and per-byte time between its
    ranks, the per-object cost of comm.allgather, the counter's fetch round trip (rank 0 busy
    in Python, as in a run) and its service time (every rank fetching at once: an upper bound,
    it includes the issue)."""
    from es_mpi import comm as mpi
    from update import read_seconds  # bench/update.py

    size, out = comm.Get_size(), {"ranks": comm.Get_size()}
    part = table.size // size
    out["node_bandwidth"] = part * 4 * size / float(np.median([read_seconds(comm, table)
                                                                for _ in range(7)]))
    digest = "0123456789abcdef"
    out["per_object"] = best_of(
        lambda: [pickle.loads(pickle.dumps(digest)) for _ in range(1000)]) / 1000
    small, big = np.zeros(1), np.zeros(2 ** 19 // size)  # 8 B and 4 MB in all
    out["intra_latency"] = out["intra_byte_time"] = 0.0
    if size > 1:
        t = best_of(lambda: [comm.Allgather(small, np.empty(size)) for _ in range(2000)]) / 2000
        out["intra_latency"] = t / np.ceil(np.log2(size))
        t = best_of(lambda: comm.Allgather(big, np.empty(big.size * size)), 5)
        out["intra_byte_time"] = max(0.0, t - out["intra_latency"] * np.ceil(np.log2(size))) \
            / (big.nbytes * (size - 1))
    counter = mpi.WorkCounter(comm)
    out["fetch_intra"] = _fetch_round_trip(comm, counter)
    out["atomic_service"] = _fetch_service(comm, counter)
    counter.free()
    return out


def _fetch_round_trip(comm, counter, seconds: float = 0.3) -> float:
    """Mean fetch round trip of the ranks > 0 while rank 0 computes in Python (rank 0 itself
    when alone)."""
    comm.Barrier()
    n, t0 = 0, time.perf_counter()
    if comm.Get_rank() == 0 and comm.Get_size() > 1:
        while time.perf_counter() - t0 < seconds:
            pass
    else:
        while time.perf_counter() - t0 < seconds:
            counter.fetch_add(1)
            n += 1
    t = time.perf_counter() - t0
    got = [x for x in comm.allgather((n, t)) if x[0]]
    return float(np.mean([t / n for n, t in got]))


def _fetch_service(comm, counter, seconds: float = 0.3) -> float:
    comm.Barrier()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        counter.fetch_add(1)
        n += 1
    t = comm.allreduce(time.perf_counter() - t0, op=max_op())
    return t / comm.allreduce(n)


def max_op():
    from es_mpi import comm as mpi
    return mpi.MPI.MAX


def with_bandwidth(costs: sm.JobCosts, bandwidth: float | None) -> sm.JobCosts:
    """The costs with the node's read bandwidth replaced (--node-bandwidth), if given."""
    if not bandwidth:
        return costs
    return dataclasses.replace(costs, update=dataclasses.replace(costs.update,
                                                                 node_bandwidth=bandwidth))


def make_fabric(measured: dict, args, ranks_per_node: int | None = None) -> sm.Fabric:
    """The measured intra-node fabric plus the assumed inter-node one (command line)."""
    return sm.fabric_from(measured, sm.Link(args.inter_latency, 1.0 / args.inter_bandwidth),
                          args.inter_fetch, args.inter_atomic,
                          ranks_per_node or args.ranks_per_node)


def node_bandwidth(inputs: dict, args) -> float:
    """The node's read bandwidth: --node-bandwidth, else the one measured with the inputs."""
    return args.node_bandwidth or inputs["fabric"]["node_bandwidth"]


# ----------------------------------------------------------------------------- one job
def job_shape(cfg, env, dim: int) -> sm.JobShape:
    from es_mpi.iteration import n_eval_items

    space = env.observation_space
    return sm.JobShape(
        n_pairs=cfg.es.population, n_eval=n_eval_items(cfg), dim=dim,
        obs_width=int(np.prod(space.shape)), int_obs=bool(np.issubdtype(space.dtype, np.integer)),
        obs_stat_prob=cfg.env.obs_stat_prob if cfg.env.normalize_obs else 0.0,
        checkpoint_every=cfg.run.checkpoint_every, verify_every=cfg.run.verify_every)


class JobMeasurement:
    """One job's measured inputs (collective: every rank measures at once, as a full node
    runs). The episode costs are measured in rounds (`episode_round`), which a caller can
    alternate with other work so that the machine's drift hits both alike."""

    def __init__(self, comm, name: str, table, bandwidth: float):
        from es_mpi.runtime import build_env_and_policy

        self.comm, self.table, self.cfg = comm, table, load(name)
        self.env, self.policy = build_env_and_policy(self.cfg)
        self.dim = self.policy.num_params
        self.rounds: list[sm.EpisodeCost] = []
        cfg, dim, space = self.cfg, self.dim, self.env.observation_space
        self.update = measure_update_cost(comm, table, cfg, dim, bandwidth)
        self.plan, self.exchange = measure_plan_exchange(cfg, dim, space)
        comm.Barrier()
        self.writes = measure_writes(cfg, dim, space.shape) if comm.Get_rank() == 0 else (0, 0)
        comm.Barrier()

    def episode_round(self, seconds: float) -> None:
        seed = 1000 * self.comm.Get_rank() + 7 * len(self.rounds)
        self.rounds.append(measure_episode_cost(self.cfg, self.env, self.policy, self.table,
                                                seconds, seed))

    def costs(self) -> sm.JobCosts | None:
        """The job's costs on rank 0 (the episode rounds of all ranks averaged); None elsewhere
        (collective)."""
        rounds = self.comm.gather(self.rounds)
        if self.comm.Get_rank() != 0:
            return None
        return sm.JobCosts(median_episode_cost(sum(rounds, [])), self.update, self.plan,
                           self.exchange, *self.writes)

    def record(self) -> dict:
        """The JSON record of the job (rank 0; collective)."""
        from es_mpi.envs import episode_limit

        costs = self.costs()
        if costs is None:
            return {}
        return {"shape": dataclasses.asdict(job_shape(self.cfg, self.env, self.dim)),
                "costs": dataclasses.asdict(costs), "episode_limit": episode_limit(self.env)}


costs_from = sm.costs_from


# ----------------------------------------------------------------------------- lengths
def checkpoint_lengths(run_dir: Path) -> dict:
    """The training-episode lengths of a run's newest checkpoint (prev_lengths: the 2N
    episodes of its last iteration) and the mean length of that iteration's evaluation."""
    from es_mpi.checkpoint import list_checkpoints, load_checkpoint

    found = list_checkpoints(run_dir)
    if not found:
        raise SystemExit(f"no checkpoint in {run_dir}; run `checkpoints` first")
    path = found[-1][1]
    state, _ = load_checkpoint(path)
    return {"source": str(path), "iteration": state.iteration,
            "train": state.prev_lengths.astype(int).tolist(),
            "eval_mean": float(np.nan_to_num(state.results["eval_length"][-1]))}


# ----------------------------------------------------------------------------- subcommands
def cmd_checkpoints(args) -> None:
    """Short real runs of each job from scratch (`python -m es_mpi.run`), shrunk population:
    their last checkpoint's prev_lengths are early-training episode lengths."""
    from paper_jobs import REPO, job_path

    for name in args.jobs:
        overrides = CHECKPOINT_RUNS[name]
        iters = next(o for o in overrides if o.startswith("run.iterations=")).split("=")[1]
        cmd = ["mpiexec", "-n", str(args.ranks), sys.executable, "-m", "es_mpi.run",
               job_path(name), *overrides, f"es.noise_table_size={SMALL_TABLE}",
               f"run.checkpoint_every={iters}", f"run.dir={Path(args.out).resolve() / name}"]
        print("$", " ".join(cmd[3:]), flush=True)
        subprocess.run(cmd, check=True, cwd=REPO)


def cmd_measure(comm, args) -> None:
    from es_mpi import comm as mpi

    table = mpi.shared_noise_table(comm, MEASURE_TABLE, 123)
    out = {"ranks": comm.Get_size(), "machine": machine(),
           "fabric": measure_fabric(comm, table.table),
           "jobs": {}}
    for name in progress(comm, args.jobs, "measure"):
        job = JobMeasurement(comm, name, table.table, out["fabric"]["node_bandwidth"])
        for _ in range(args.rounds):
            job.episode_round(args.seconds / args.rounds)
        m = job.record()
        if comm.Get_rank() == 0 and args.checkpoints:
            m["lengths"] = checkpoint_lengths(Path(args.checkpoints) / name)
        out["jobs"][name] = m
    table.free()
    if comm.Get_rank() == 0:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.out}", flush=True)


def machine() -> str:
    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor()) \
        if Path("/proc/cpuinfo").exists() else platform.processor()
    return f"{cpu}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}"


def progress(comm, items, what: str):
    if comm is not None and comm.Get_rank() != 0:
        return items
    from tqdm import tqdm
    return tqdm(items, desc=what, file=sys.stderr)



# ----------------------------------------------------------------------------- check
class RealRun:
    """Real iterations of a shrunk job (bench/throughput.py's ESPath, after `warmup`
    iterations: the first has no episode cap and no statistics, and the process's memory
    grows for a few more), each recorded with its episode lengths in item order (the
    evaluation episodes at their mean length, which is what the results row keeps)."""

    def __init__(self, comm, cfg, warmup: int):
        from throughput import ESPath  # bench/throughput.py

        self.comm, self.path = comm, ESPath(cfg, comm, warmup=warmup)
        self.rt, self.rows = self.path.rt, self.path.rows
        self.lengths, self.core_share = [], []
        self.shape = job_shape(cfg, self.rt.env, self.rt.policy.num_params)

    def step(self) -> None:
        """One iteration; also records the smallest share of a core any rank got during it
        (CPU seconds / wall seconds: a rank waiting in MPI spins, so only a rank the OS or
        the hypervisor took the core from gets less than all of it)."""
        wall, cpu = time.perf_counter(), time.process_time()
        self.path.step()
        share = (time.process_time() - cpu) / (time.perf_counter() - wall)
        self.core_share.append(min(self.comm.allgather(share)))
        n_eval, row = self.shape.n_eval, self.rows[-1]
        evals = np.full(n_eval, int(round(row.eval_length)) if n_eval else 0, np.int64)
        self.lengths.append(sm.item_lengths(evals, self.path.state.prev_lengths))


def check_line(name: str, variant: tuple, run: "RealRun", preds: list, ranks: int) -> tuple:
    """One row of the check: medians over the iterations (a shared machine's interference
    makes rare iterations 2x slower: `disturbed` counts those where a rank had < 90 % of a
    core), the error as the median of the per-iteration ratios."""
    rows = run.rows

    def med(values) -> float:
        return float(np.median(list(values)))

    meas, pred = med(r.iteration_seconds for r in rows), med(p.iteration for p in preds)
    error = med(p.iteration / r.iteration_seconds for r, p in zip(rows, preds)) - 1
    disturbed = sum(share < 0.9 for share in run.core_share)
    ok = abs(error) <= 0.15
    line = (f"| {name} | {' + '.join(variant)} | {ranks} | {meas:.3f} | {pred:.3f} | "
            f"{100 * error:+.1f} % | {np.mean([r.iteration_seconds for r in rows]):.3f} | "
            f"{disturbed} of {len(rows)} | {med(r.time_rollout + r.time_comm for r in rows):.3f} "
            f"/ {med(p.plan + p.rollout + p.exchange for p in preds):.3f} | "
            f"{1e3 * med(r.time_update for r in rows):.1f} / "
            f"{1e3 * med(p.update for p in preds):.1f}"
            f" | {100 * med(r.rollout_idle for r in rows):.1f} / "
            f"{100 * med(p.rollout_idle for p in preds):.1f} | {'PASS' if ok else 'MISS'} |")
    return line, ok


def check_job(comm, name: str, table, fabric: sm.Fabric, bandwidth: float, args) -> list:
    """Real iterations of the shrunk job under each CHECK_VARIANT, alternating with rounds of
    the episode-cost measurement; each iteration predicted from its own lengths. (Both
    variants run the same episodes: theta does not depend on the assignment.)"""
    ranks = comm.Get_size()
    job = JobMeasurement(comm, name, table, bandwidth)
    runs = {v: RealRun(comm, shrunk(name, ranks, overrides=[f"run.assignment={v[0]}",
                                                             f"run.update={v[1]}"]), args.warmup)
            for v in CHECK_VARIANTS}
    order = list(runs.values())
    for r in range(args.iterations):
        job.episode_round(args.seconds / args.iterations)
        for run in order[r % len(order):] + order[:r % len(order)]:  # each goes first in turn
            run.step()
    for run in runs.values():
        run.rt.free()
    costs = job.costs()
    if costs is None:
        return []
    return [check_line(name, v, run, [sm.predict(run.shape, costs, fabric, lens, ranks, *v)
                                      for lens in run.lengths], ranks)
            for v, run in runs.items()]


def cmd_check(comm, args) -> None:
    """Measure the inputs at this rank count, run real shrunk iterations, predict each from
    its own episode lengths, print both."""
    from es_mpi import comm as mpi

    table = mpi.shared_noise_table(comm, MEASURE_TABLE, 123)
    measured = measure_fabric(comm, table.table)
    fabric = make_fabric(measured, args, ranks_per_node=comm.Get_size())  # all on this machine
    lines = sum((check_job(comm, name, table.table, fabric, measured["node_bandwidth"], args)
                 for name in progress(comm, args.jobs, "check")), [])
    table.free()
    rank0_print(comm, f"{comm.Get_size()} rank(s); {args.iterations} iterations per row after "
                f"{args.warmup} warm-up iterations, alternating with the episode-cost "
                "measurement; medians over the iterations, measured / predicted\n"
                "| job | variant | P | measured s | predicted s | error | mean measured s | "
                "disturbed | rollout+exchange s | update ms | rollout idle % | within 15 % |\n"
                + "|---" * 12 + "|\n" + "\n".join(line for line, _ in lines))
    rank0_print(comm, f"{sum(ok for _, ok in lines)} of {len(lines)} within 15 %")


# ----------------------------------------------------------------------------- predict
def distributions(name: str, m: dict, shape: sm.JobShape, args) -> dict:
    """name -> draw(rng) of item lengths at the job's full size. early: the checkpoint's
    lengths resampled (evaluation episodes at that iteration's mean); late (Humanoid only):
    full-length episodes with probability --full-share, else an early fall."""
    lens = m["lengths"]
    train, n = np.asarray(lens["train"]), 2 * shape.n_pairs
    early_eval = np.full(shape.n_eval, int(round(lens["eval_mean"])))
    out = {"early": lambda rng: sm.item_lengths(early_eval, sm.resample(train, n, rng))}
    if name in args.late_jobs:
        limit = m["episode_limit"]
        out["late"] = lambda rng: sm.item_lengths(
            np.full(shape.n_eval, limit), sm.late_mix(train, n, limit, args.full_share, rng))
    return out


def predict_all(inputs: dict, fabric: sm.Fabric, args) -> dict:
    """(job, distribution) -> (assignment, update) -> [Prediction at each of RANKS]."""
    out = {}
    work = [(name, m) for name, m in inputs["jobs"].items() if name in args.jobs]
    for name, m in progress(None, work, "predict"):
        shape = sm.JobShape(**m["shape"])
        costs = with_bandwidth(costs_from(m["costs"]), node_bandwidth(inputs, args))
        for dist, draw in distributions(name, m, shape, args).items():
            out[name, dist] = {v: [sm.mean_prediction(
                draw, args.samples, args.seed,
                lambda lens, p=p, v=v: sm.predict(shape, costs, fabric, lens, p, *v))
                for p in RANKS] for v in VARIANTS}
    return out


def variant_table(preds: dict) -> str:
    head = " | ".join(" + ".join(v) for v in VARIANTS)
    lines = [f"| P | {head} | ideal rollout |", "|---" * (len(VARIANTS) + 2) + "|"]
    for i, p in enumerate(RANKS):
        cells = " | ".join(f"{preds[v][i].total:.3g} s ({100 * preds[v][i].rollout_idle:.1f} %)"
                           for v in VARIANTS)
        lines.append(f"| {p} | {cells} | {preds[VARIANTS[0]][i].ideal_rollout:.3g} s |")
    return "\n".join(lines)


def stage_table(preds: list) -> str:
    lines = ["| P | plan | rollout | exchange | update | loop | per iteration | rollout idle "
             "| / ideal |", "|---" * 9 + "|"]
    for p in preds:
        lines.append(f"| {p.ranks} | {1e3 * p.plan:.1f} ms | {p.rollout:.3g} s | "
                     f"{1e3 * p.exchange:.2f} ms | {p.update:.3g} s | {1e3 * p.loop:.1f} ms | "
                     f"{p.total:.3g} s | {100 * p.rollout_idle:.2f} % | "
                     f"{p.total / p.ideal_rollout:.2f} |")
    return "\n".join(lines)


def print_predictions(inputs: dict, results: dict, full_share: float) -> None:
    for (name, dist), preds in results.items():
        m = inputs["jobs"][name]
        shape, lens = m["shape"], m["lengths"]
        train = np.asarray(lens["train"])
        what = (f"checkpoint iteration {lens['iteration']}: {train.size} episodes, mean "
                f"{train.mean():.0f}, max {train.max()} steps" if dist == "early" else
                f"{100 * full_share:.0f} % full {m['episode_limit']}-step episodes, the "
                "rest early falls")
        print(f"\n### {name}: N = {shape['n_pairs']:,} pairs, d = {shape['dim']:,}, E = "
              f"{shape['n_eval']}; {dist} lengths ({what})\n", flush=True)
        print("Seconds per iteration (rollout idle):\n\n" + variant_table(preds), flush=True)
        print(f"\n{' + '.join(DEFAULT)} by stage:\n\n" + stage_table(preds[DEFAULT]),
              flush=True)


def summary_table(results: dict, at: tuple = (300, 1440)) -> str:
    """Every job and length distribution at a few rank counts: seconds (rollout idle)."""
    head = " | ".join(" + ".join(v) for v in VARIANTS)
    lines = [f"| job | lengths | P | {head} | ideal rollout |", "|---" * (len(VARIANTS) + 4) + "|"]
    for (name, dist), preds in results.items():
        for p in at:
            i = RANKS.index(p)
            cells = " | ".join(f"{preds[v][i].total:.3g} s ({100 * preds[v][i].rollout_idle:.1f} %)"
                               for v in VARIANTS)
            lines.append(f"| {name} | {dist} | {p:,} | {cells} | "
                         f"{preds[VARIANTS[0]][i].ideal_rollout:.3g} s |")
    return "\n".join(lines)


def targets(results: dict) -> list[str]:
    """The two targets under the defaults (DEFAULT), PASS/MISS with the reason."""
    out, how = [], " + ".join(DEFAULT)
    for dist in ("early", "late"):
        if ("humanoid_dt", dist) in results:
            p = results["humanoid_dt", dist][DEFAULT][RANKS.index(300)]
            ok = p.rollout_idle <= 0.05
            out.append(f"humanoid_dt, {dist} lengths, {how}, 300 ranks: rollout idle "
                       f"{100 * p.rollout_idle:.2f} % (target <= 5 %): "
                       f"{'PASS' if ok else 'MISS: ' + reason(p)}")
        if ("humanoid_openai", dist) in results:
            p = results["humanoid_openai", dist][DEFAULT][RANKS.index(1440)]
            ratio = p.total / p.ideal_rollout
            out.append(f"humanoid_openai (Salimans: 10,000 episodes), {dist} lengths, {how}, "
                       f"1,440 ranks: {p.total:.3g} s per iteration, ideal "
                       f"{p.ideal_rollout:.3g} s (episode work / P + longest episode): "
                       f"{ratio:.2f}x (target <= 1.5x; against the lower bound max(work / P, "
                       f"longest) = {p.lower_bound:.3g} s: {p.total / p.lower_bound:.2f}x): "
                       f"{'PASS' if ratio <= 1.5 else 'MISS: ' + reason(p)}")
    return out


def reason(p: sm.Prediction) -> str:
    parts = {"the rollout's excess over the ideal": p.rollout - p.ideal_rollout,
             "the update": p.update, "the exchange": p.exchange, "the loop": p.loop}
    worst = max(parts, key=parts.get)
    return (f"{worst} costs {parts[worst]:.3g} s (rollout {p.rollout:.3g} s, idle "
            f"{100 * p.rollout_idle:.1f} %; update {p.update:.3g} s; exchange "
            f"{1e3 * p.exchange:.2g} ms)")


def plot(results: dict, inputs: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(name for name, _ in results))
    cols = min(2, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.2 * rows), squeeze=False)
    colors = dict(zip(VARIANTS, ("tab:blue", "tab:green", "tab:cyan", "tab:red", "tab:orange")))
    for ax, name in zip(axes.ravel(), names):
        for dist, style in (("early", "-"), ("late", "--")):
            if (name, dist) not in results:
                continue
            preds = results[name, dist]
            for v in VARIANTS:
                ax.loglog(RANKS, [p.total for p in preds[v]], style, color=colors[v], marker=".",
                          label=f"{' + '.join(v)}, {dist}")
            ax.loglog(RANKS, [p.ideal_rollout for p in preds[VARIANTS[0]]], style, color="k",
                      lw=0.8, label=f"ideal (work / P + longest), {dist}")
        shape = inputs["jobs"][name]["shape"]
        ax.set_title(f"{name}\nN={shape['n_pairs']:,} pairs, d={shape['dim']:,}", fontsize=9)
        ax.set_xlabel("ranks P")
        ax.set_ylabel("predicted seconds per iteration")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes.ravel()[len(names):]:
        ax.set_visible(False)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=7)
    fig.suptitle("es_mpi: predicted seconds per iteration (solid: early-training episode "
                 "lengths, dashed: late-training-like)", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    fig.savefig(path, dpi=90)
    print(f"\nwrote {path}", flush=True)


def cmd_predict(args) -> None:
    inputs = json.loads(Path(args.inputs).read_text())
    fabric = make_fabric(inputs["fabric"], args)
    print(f"inputs {args.inputs}: measured at {inputs['ranks']} ranks on {inputs['machine']}; "
          f"{args.ranks_per_node} ranks per node; between nodes (assumed): latency "
          f"{args.inter_latency * 1e6:.1f} us, {args.inter_bandwidth / 1e9:.1f} GB/s, fetch "
          f"{args.inter_fetch * 1e6:.1f} us, atomic service {args.inter_atomic * 1e6:.2f} us; "
          f"mean of {args.samples} length draws", flush=True)
    results = predict_all(inputs, fabric, args)
    print_predictions(inputs, results, args.full_share)
    print("\n## Summary: seconds per iteration (rollout idle)\n\n" + summary_table(results),
          flush=True)
    found = targets(results)
    print("\n## Targets\n\n" + "\n".join(f"- {t}" for t in found), flush=True)
    if args.plot:
        plot(results, inputs, args.plot)


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("checkpoints", "measure", "check", "predict"))
    p.add_argument("--jobs", default=",".join(PAPER_JOBS), type=lambda s: s.split(","))
    p.add_argument("--out", default="/tmp/scale_model_inputs.json",
                   help="measure: the inputs JSON; checkpoints: a directory")
    p.add_argument("--inputs", default="docs/scale_model_inputs.json", help="predict: inputs")
    p.add_argument("--checkpoints", help="measure: directory of the `checkpoints` runs")
    p.add_argument("--ranks", type=int, default=2, help="checkpoints: ranks of the short runs")
    p.add_argument("--seconds", type=float, default=4.0,
                   help="seconds of episodes timed per job (over all rounds)")
    p.add_argument("--iterations", type=int, default=4, help="check: timed iterations per row")
    p.add_argument("--warmup", type=int, default=2, help="check: untimed first iterations")
    p.add_argument("--rounds", type=int, default=3, help="measure: episode-cost rounds")
    p.add_argument("--plot", help="predict: write the PNG here")
    p.add_argument("--samples", type=int, default=5, help="predict: length draws averaged")
    p.add_argument("--seed", type=int, default=0, help="predict: seed of the length draws")
    p.add_argument("--full-share", type=float, default=0.7,
                   help="late lengths: share of full-length episodes")
    p.add_argument("--late-jobs", default="humanoid_mlp,humanoid_dt,humanoid_openai",
                   type=lambda s: s.split(","), help="jobs that get a late distribution")
    p.add_argument("--ranks-per-node", type=int, default=16)
    p.add_argument("--node-bandwidth", type=float, default=None,
                   help="predict: the node's memory read bandwidth, bytes/s (default: measured)")
    p.add_argument("--inter-latency", type=float, default=2e-6, help="assumed: s per message")
    p.add_argument("--inter-bandwidth", type=float, default=10e9, help="assumed: bytes/s")
    p.add_argument("--inter-fetch", type=float, default=3e-6,
                   help="assumed: counter fetch round trip from another node, s")
    p.add_argument("--inter-atomic", type=float, default=5e-7,
                   help="assumed: s rank 0's NIC spends per remote atomic")
    args = p.parse_args(argv)
    if args.command == "measure" and not args.checkpoints:
        p.error("measure needs --checkpoints DIR (the episode lengths of real runs: make them "
                "with `python bench/scale_model.py checkpoints --out DIR`)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.command == "checkpoints":
        return cmd_checkpoints(args)
    if args.command == "predict":
        return cmd_predict(args)
    import torch

    from es_mpi import comm as mpi

    torch.set_num_threads(1)
    comm = mpi.world()
    command = cmd_measure if args.command == "measure" else cmd_check
    mpi.abort_on_exception(comm, command, comm, args)


if __name__ == "__main__":
    main()
