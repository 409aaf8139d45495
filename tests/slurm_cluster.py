"""A real single-node SLURM (Debian's 22.05 packages) in a temporary directory, for tests.

`SlurmCluster` writes its own slurm.conf and starts a private munged, slurmctld and slurmd:
their own socket, ports, state and logs under one temp dir, so it touches nothing system-wide
and two clusters can run side by side. Commands are pointed at it with `SLURM_CONF` (see
`cluster.env`). It stops exactly the three PIDs it started.

Use from pytest through the `slurm_cluster` fixture, or by hand:
    python tests/slurm_cluster.py     # starts one, prints `export SLURM_CONF=...`, Ctrl-C stops
"""
from __future__ import annotations

import os
import shutil
import sys
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd")

SLURM_CONF = """\
ClusterName=esmpi
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
AuthInfo=socket={munge_socket},cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobRequeue=1
ReturnToService=2
KillWait=5
MinJobAge=600
SchedulerParameters=bf_interval=1,sched_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=localhost NodeAddr=127.0.0.1 NodeHostname=localhost CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class SlurmUnavailable(RuntimeError):
    """This machine cannot run a local SLURM (not root, no apt, install failed): skip."""


class SlurmStartError(RuntimeError):
    """SLURM is installed but did not come up: a real failure, not a reason to skip."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_installed() -> None:
    """Install Debian's slurm-wlm and munge if missing; raise SlurmUnavailable if we cannot."""
    if all(Path(d).exists() for d in DAEMONS):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("SLURM is not installed and this is not root (cannot apt-get)")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable("SLURM is not installed and apt-get is not available")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=300)
        res = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            raise SlurmUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: "
                                   + res.stderr.strip()[-500:])


class SlurmCluster:
    """One node (`localhost`) with `cpus` CPUs and one partition (`debug`)."""

    def __init__(self, cpus: int | None = None, parent: str = "/tmp") -> None:
        self.cpus = cpus or os.cpu_count() or 1
        # a short path: unix socket paths live under it
        self.root = Path(tempfile.mkdtemp(prefix="esslurm-", dir=parent))
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # --- lifecycle
    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        try:
            if os.geteuid() != 0:
                raise SlurmUnavailable("a local SLURM needs root (slurmd runs jobs as any user)")
            ensure_installed()
            self._start_munge(timeout)
            self._write_conf()
            for sub in ("state", "spool"):
                (self.root / sub).mkdir()
            self._spawn("slurmctld", ["/usr/sbin/slurmctld", "-D", "-i", "-f", str(self.conf)])
            self._spawn("slurmd", ["/usr/sbin/slurmd", "-D", "-N", "localhost", "-f",
                                   str(self.conf)])
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel our jobs, then TERM (and if needed KILL) the daemons we started, by PID."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--partition=debug", check=False)
            self._wait_queue_empty(30)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- commands against this cluster
    def run(self, *cmd: str, check: bool = True, timeout: float = 30,
            env: dict | None = None) -> subprocess.CompletedProcess:
        res = subprocess.run(list(cmd), env={**self.env, **(env or {})}, capture_output=True,
                             text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr}")
        return res

    def sbatch(self, *args: str, env: dict | None = None, cwd: str | None = None) -> str:
        """Submit; return the job id (for an array, the array's job id)."""
        res = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})},
                             cwd=cwd, capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {res.stderr}")
        return res.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> list[dict]:
        """`scontrol show job` records (one per array task) as dicts of their KEY=VALUE fields."""
        res = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        records = []
        for line in res.stdout.splitlines():
            fields = {}
            for word in line.split():
                if "=" in word:
                    key, value = word.split("=", 1)
                    fields[key] = value
            records.append(fields)
        return records

    def wait_done(self, job_id: str, timeout: float) -> list[dict]:
        """Poll until no task of the job is pending/running/requeued; return the records."""
        deadline = time.monotonic() + timeout
        active = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED",
                  "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT"}
        while True:
            records = self.job_info(job_id)
            if records and not any(r.get("JobState") in active for r in records):
                return records
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still active after {timeout:.0f}s: "
                                   + ", ".join(r.get("JobState", "?") for r in records))
            time.sleep(0.5)

    def wait_state(self, job_id: str, state: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for rec in self.job_info(job_id):
                if rec.get("JobState") == state:
                    return rec
            time.sleep(0.25)
        raise TimeoutError(f"job {job_id} never reached {state} in {timeout:.0f}s")

    def logs(self) -> str:
        """The daemons' logs, for failure messages."""
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            path = self.root / name
            if path.exists():
                parts.append(f"--- {name} (tail)\n" + "\n".join(
                    path.read_text(errors="replace").splitlines()[-40:]))
        return "\n".join(parts)

    # --- internals
    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / f"{name}.stdout", "wb")
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()

    def _start_munge(self, timeout: float) -> None:
        mdir = self.munge_socket.parent
        mdir.mkdir(mode=0o700)
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        self._spawn("munged", ["/usr/sbin/munged", "--foreground", "--force",
                               f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--pid-file={mdir / 'munged.pid'}",
                               f"--log-file={self.root / 'munged.log'}",
                               f"--seed-file={mdir / 'munged.seed'}"])
        deadline = time.monotonic() + timeout
        while True:
            cred = subprocess.run(["munge", "-n", "-S", str(self.munge_socket)],
                                  capture_output=True)
            if cred.returncode == 0 and subprocess.run(
                    ["unmunge", "-S", str(self.munge_socket)], input=cred.stdout,
                    capture_output=True).returncode == 0:
                return
            if self.procs["munged"].poll() is not None or time.monotonic() > deadline:
                raise SlurmStartError("munged did not start: " + self._tail("munged"))
            time.sleep(0.1)

    def _write_conf(self) -> None:
        self.conf.write_text(SLURM_CONF.format(
            root=self.root, cpus=self.cpus, memory=node_memory_mib(),
            munge_socket=self.munge_socket,
            ctld_port=_free_port(), slurmd_port=_free_port()))

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name in ("slurmctld", "slurmd"):
                if self.procs[name].poll() is not None:
                    raise SlurmStartError(f"{name} exited: " + self._tail(name))
            state = self.run("sinfo", "-h", "-o", "%t", check=False).stdout.strip()
            if state == "idle":
                return
            time.sleep(0.25)
        raise SlurmStartError(f"node not idle after {timeout:.0f}s\n" + self.logs())

    def _wait_queue_empty(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            res = self.run("squeue", "-h", "-o", "%i", check=False)
            if res.returncode != 0 or not res.stdout.strip():
                return
            time.sleep(0.5)

    def _tail(self, name: str) -> str:
        texts = []
        for path in (self.root / f"{name}.stdout", self.root / f"{name}.log"):
            if path.exists():
                texts.append(path.read_text(errors="replace")[-1500:])
        return "\n".join(texts)


def node_memory_mib() -> int:
    """Most of this machine's memory, MiB: the templates ask for --mem-per-cpu, which SLURM
    checks against the node's RealMemory (slurmd refuses a node that claims more than it has)."""
    with open("/proc/meminfo") as f:
        total_kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    return int(total_kib / 1024 * 0.9)


def start_or_skip_reason(cpus: int | None = None,
                         parent: str = "/tmp") -> tuple[SlurmCluster | None, str]:
    """Start a cluster, or return (None, why not) when this machine cannot run one."""
    cluster = SlurmCluster(cpus, parent)
    try:
        return cluster.start(), ""
    except SlurmUnavailable as exc:
        return None, str(exc)


try:
    import pytest
except ImportError:  # the module also runs by hand, without pytest
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="module")
    def slurm_cluster():
        """A running local SLURM for this test module; skips (saying why) where impossible."""
        cluster, why = start_or_skip_reason()
        if cluster is None:
            print(f"\nSLURM tests skipped: {why}", file=sys.stderr)
            pytest.skip(f"no local SLURM: {why}")
        try:
            yield cluster
        finally:
            cluster.stop()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    with SlurmCluster() as c:
        print(f"export SLURM_CONF={c.conf}    # Ctrl-C stops the cluster", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
