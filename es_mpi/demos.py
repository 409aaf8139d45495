"""Demonstration datasets in Minari's format (Farama's offline-RL standard, HDF5 underneath).

`es_mpi.collect` writes them and `es_mpi.pretrain` reads them, and any Minari dataset made
elsewhere (Minari's DataCollector, `minari download`, a D4RL port) reads the same way: a
dataset is the folder that holds `data/metadata.json` (or that `data` folder itself), or a
dataset id in Minari's local store (`MINARI_DATASETS_PATH`, default ~/.minari/datasets).

Minari is an optional dependency (`pip install 'es_mpi[pretrain]'`, Python >= 3.11); only
this module imports it. Observations are stored raw (a policy's normalisation is its own),
actions as the environment applied them, images without JPEG compression (lossless).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np

from .config import ConfigError

DATA_DIR = "data"  # Minari's layout: <dataset>/data/{metadata.json, main_data.hdf5}
MINARI_HINT = "install it with: pip install 'es_mpi[pretrain]' (Minari needs Python >= 3.11)"


def require_minari():
    try:
        import minari
    except ImportError:
        raise ConfigError(f"Minari datasets need the package 'minari'; {MINARI_HINT}") from None
    return minari


@dataclass
class Episode:
    """One episode as Minari stores it: T steps, T+1 observations (the reset one first)."""

    observations: np.ndarray  # (T+1, *obs) raw observations
    actions: np.ndarray  # (T, *act) the actions the environment applied
    rewards: np.ndarray  # (T,) float64
    terminations: np.ndarray  # (T,) bool
    truncations: np.ndarray  # (T,) bool (also set on the last step of an episode cut short)
    seed: int | None = None  # the environment's reset seed

    @property
    def ret(self) -> float:
        return float(np.sum(self.rewards))


# ----------------------------------------------------------------------------- spaces
def space_summary(space: gym.Space) -> dict:
    """What a policy's shape depends on: Box shape and dtype, or Discrete n (JSON-ready)."""
    if isinstance(space, gym.spaces.Discrete):
        return {"kind": "Discrete", "n": int(space.n)}
    if isinstance(space, gym.spaces.Box):
        return {"kind": "Box", "shape": list(space.shape), "dtype": np.dtype(space.dtype).name}
    raise ConfigError(f"unsupported space {space} (es_mpi policies take Box observations and "
                      "Box or Discrete actions)")


def space_mismatch(what: str, have: dict, want: dict) -> str | None:
    """None if compatible, else a sentence naming the difference. Box dtypes must agree in
    kind (integer frames vs float vectors); float32 data for a float64 env is fine."""
    def kind(s: dict) -> tuple:
        if s["kind"] == "Discrete":
            return ("Discrete", s["n"])
        return ("Box", tuple(s["shape"]), np.dtype(s["dtype"]).kind == "f")
    if kind(have) == kind(want):
        return None
    return f"{what} space {_describe(have)} does not match the job's {_describe(want)}"


def _describe(s: dict) -> str:
    if s["kind"] == "Discrete":
        return f"Discrete({s['n']})"
    return f"Box(shape {tuple(s['shape'])}, {s['dtype']})"


def applied_action(action, space: gym.Space) -> np.ndarray:
    """The action as the environment applies it: Box actions clipped to finite bounds
    (MuJoCo clamps to its ctrlrange; es_mpi's tanh outputs may lie beyond it)."""
    if isinstance(space, gym.spaces.Box):
        a = np.asarray(action, dtype=space.dtype).reshape(space.shape)
        low = np.where(np.isfinite(space.low), space.low, -np.inf)
        high = np.where(np.isfinite(space.high), space.high, np.inf)
        return np.clip(a, low, high).astype(space.dtype)
    return np.asarray(action, dtype=np.int64)


# ----------------------------------------------------------------------------- writing
COMPLETE_KEY = "es_mpi_complete"  # "false" while es_mpi.collect writes, "true" once done


class DatasetWriter:
    """Writes a Minari dataset at `path` (`path/data/...`) episode by episode, in order. Its
    metadata says `es_mpi_complete: false` until `close`, so an interrupted collection is
    recognised (`reopen` continues it, `load_demos` refuses it)."""

    def __init__(self, path: str | Path, observation_space: gym.Space,
                 action_space: gym.Space, env_spec=None, metadata: dict | None = None):
        require_minari()
        from minari.dataset.minari_storage import MinariStorage

        self.path = Path(path).absolute()  # Minari joins a relative path onto itself
        if (self.path / DATA_DIR / "metadata.json").exists():
            raise ConfigError(f"--out: a dataset already exists at {self.path}; remove it or "
                              "choose another path")
        (self.path / DATA_DIR).mkdir(parents=True, exist_ok=True)
        self.storage = MinariStorage.new(self.path / DATA_DIR, observation_space, action_space,
                                         env_spec=_serialisable(env_spec), data_format="hdf5",
                                         jpeg_encoding=False)
        self.storage.update_metadata({**dataset_metadata(self.path.name, metadata or {}),
                                      COMPLETE_KEY: "false"})
        self.returns: list[float] = []  # of the episodes written (reopen: read back)

    @classmethod
    def reopen(cls, path: str | Path) -> "DatasetWriter":
        """An interrupted dataset, to continue: episodes beyond the metadata's count (written
        when the collection was stopped) are dropped. ConfigError if it cannot be read."""
        import h5py
        from minari.dataset.minari_storage import MinariStorage

        self = cls.__new__(cls)
        self.path = Path(path).absolute()
        data = self.path / DATA_DIR
        try:
            self.storage = MinariStorage.read(data)
            n = self.storage.total_episodes
            with h5py.File(data / "main_data.hdf5", "a") as f:
                for name in [k for k in f if k.startswith("episode_")
                             and int(k.split("_", 1)[1]) >= n]:
                    del f[name]
                self.returns = [float(np.sum(f[f"episode_{i}/rewards"][()])) for i in range(n)]
        except (OSError, KeyError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"--out: the interrupted dataset at {self.path} cannot be read "
                              f"({exc}); pass --overwrite to start it afresh") from None
        return self

    @property
    def episodes(self) -> int:
        return self.storage.total_episodes

    def add(self, episodes: list[Episode]) -> None:
        from minari.data_collector.episode_buffer import EpisodeBuffer

        self.storage.update_episodes([
            EpisodeBuffer(seed=ep.seed, observations=ep.observations, actions=ep.actions,
                          rewards=ep.rewards, terminations=ep.terminations,
                          truncations=ep.truncations, infos={}) for ep in episodes])
        self.returns += [ep.ret for ep in episodes]

    def close(self) -> Path:
        self.storage.update_metadata({"dataset_size": self.storage.get_size(),
                                      COMPLETE_KEY: "true"})
        return self.path


def read_dataset_metadata(path: str | Path) -> dict | None:
    """The raw metadata of the dataset at `path` (its folder), None if there is none;
    ConfigError if its `data` folder holds something unreadable."""
    data = Path(path) / DATA_DIR
    if not data.is_dir() or not any(data.iterdir()):
        return None
    try:
        return json.loads((data / "metadata.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--out: {data} holds no readable Minari metadata ({exc}); pass "
                          "--overwrite to replace it, or choose another path") from None


def remove_dataset(path: str | Path) -> None:
    """Delete the dataset at `path`: its `data` folder only (the folder may hold more)."""
    import shutil

    shutil.rmtree(Path(path) / DATA_DIR)


def dataset_metadata(name: str, extra: dict) -> dict:
    """Minari's required keys (a dataset id needs a version: `<name>-v0` unless the folder's
    name has one) plus es_mpi's provenance under `es_mpi_*` keys (JSON strings)."""
    minari, extra = require_minari(), dict(extra)
    dataset_id = name if "-v" in name and name.rsplit("-v", 1)[1].isdigit() else f"{name}-v0"
    meta = {"dataset_id": dataset_id, "minari_version": minari.__version__,
            "algorithm_name": extra.pop("algorithm_name", "es_mpi.collect"),
            "description": extra.pop("description", "collected with es_mpi.collect")}
    meta.update({f"es_mpi_{k}": json.dumps(v) for k, v in extra.items()})
    return meta


def _serialisable(env_spec):
    """gymnasium's EnvSpec if it can be written as JSON (Atari wrappers are not registered)."""
    if env_spec is None:
        return None
    try:
        env_spec.to_json()
    except (TypeError, ValueError, AttributeError):
        return None
    return env_spec


# ----------------------------------------------------------------------------- reading
@dataclass
class Demos:
    """A whole dataset in memory: episodes concatenated, each episode's last (post-terminal)
    observation dropped, so row i is (observation, action, reward) of one step."""

    observations: np.ndarray  # (S, *obs) raw, in the dataset's dtype
    actions: np.ndarray  # (S, *act) float32, or (S,) int64 for Discrete
    rewards: np.ndarray  # (S,) float64
    starts: np.ndarray  # (E,) int64: row of each episode's first step
    lengths: np.ndarray  # (E,) int64
    observation_space: gym.Space
    action_space: gym.Space
    source: str  # what was loaded (path or id)
    metadata: dict = field(default_factory=dict)
    terminated: np.ndarray | None = None  # (E,) bool: the episode's last step terminated it

    @property
    def episodes(self) -> int:
        return len(self.starts)

    @property
    def steps(self) -> int:
        return len(self.rewards)

    def episode_returns(self) -> np.ndarray:
        return np.add.reduceat(self.rewards, self.starts) if self.steps else np.zeros(0)

    def returns_to_go(self) -> np.ndarray:
        """(S,) float64: the undiscounted sum of the rewards from each step to its episode's end."""
        out = np.empty_like(self.rewards)
        for s, n in zip(self.starts, self.lengths):
            out[s:s + n] = np.cumsum(self.rewards[s:s + n][::-1])[::-1]
        return out

    def es_mpi_meta(self, key: str):
        """es_mpi's provenance entry `key` (None for datasets made elsewhere)."""
        raw = self.metadata.get(f"es_mpi_{key}")
        return None if raw is None else json.loads(raw)


def find_dataset(spec: str) -> Path:
    """The `data` folder of a dataset given as a folder, its `data` folder, or a local id."""
    p = Path(spec).absolute()  # Minari mis-joins relative paths
    for cand in (p / DATA_DIR, p):
        if (cand / "metadata.json").is_file():
            return cand
    require_minari()
    from minari.storage.datasets_root_dir import get_dataset_path

    local = Path(get_dataset_path(spec)) / DATA_DIR
    if (local / "metadata.json").is_file():
        return local
    raise ConfigError(f"--data: no Minari dataset at {spec!r} (no {p / DATA_DIR}/metadata.json),"
                      f" and no local dataset with that id ({local})")


def load_demos(spec: str, allow_incomplete: bool = False) -> Demos:
    """Every episode of a Minari dataset, read with Minari's own API. An interrupted
    es_mpi.collect is a ConfigError unless `allow_incomplete`."""
    minari = require_minari()
    data = find_dataset(spec)
    try:
        ds = minari.MinariDataset(data)
    except (ValueError, KeyError, OSError) as exc:
        raise ConfigError(f"--data: {spec!r} is not a readable Minari dataset: {exc}") from None
    check_complete(spec, dict(ds.storage.metadata), allow_incomplete)
    obs, act, rew, lengths, term = [], [], [], [], []
    for ep in ds.iterate_episodes():
        if isinstance(ep.observations, (dict, tuple)) or isinstance(ep.actions, (dict, tuple)):
            raise ConfigError(f"--data: {spec!r} has dict/tuple observations or actions; "
                              "es_mpi policies take arrays")
        n = len(ep.rewards)
        obs.append(np.asarray(ep.observations)[:n])
        act.append(np.asarray(ep.actions)[:n])
        rew.append(np.asarray(ep.rewards, dtype=np.float64))
        lengths.append(n)
        term.append(bool(n and np.asarray(ep.terminations)[n - 1]))
    if not lengths or sum(lengths) == 0:
        raise ConfigError(f"--data: {spec!r} holds no steps")
    lengths = np.array(lengths, dtype=np.int64)
    discrete = isinstance(ds.action_space, gym.spaces.Discrete)
    actions = np.concatenate(act)
    actions = actions.astype(np.int64).reshape(-1) if discrete else actions.astype(np.float32)
    return Demos(np.concatenate(obs), actions, np.concatenate(rew),
                 np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64), lengths,
                 ds.observation_space, ds.action_space, str(spec),
                 dict(ds.storage.metadata), np.array(term, dtype=bool))


def check_complete(spec: str, metadata: dict, allow: bool) -> None:
    """An es_mpi.collect that was stopped before its end: ConfigError, or (allow) a warning."""
    if metadata.get(COMPLETE_KEY) != "false":
        return  # finished, or made elsewhere
    planned = json.loads(metadata.get("es_mpi_episodes", "null"))
    what = (f"--data: {spec!r} is an interrupted es_mpi.collect ({metadata.get('total_episodes')}"
            f" of {planned if planned is not None else '?'} episodes)")
    if not allow:
        raise ConfigError(f"{what}; rerun its collect command to finish it, or pass "
                          "--allow-incomplete to use the episodes it has")
    import sys

    print(f"es_mpi: WARNING: {what}; using the episodes it has (--allow-incomplete)",
          file=sys.stderr, flush=True)
