"""Print, per rank, digests of the state an es_mpi.run job starts its first iteration from
(theta and observation statistics), through the run's own set-up (load, preflight,
build_policy, start). Usage: init_state.py JOB.yaml [overrides...]"""
import sys

from es_mpi import comm as mpi
from es_mpi.config import load_job
from es_mpi.runtime import build_policy, preflight, start

comm = mpi.world()
cfg = load_job(sys.argv[1], sys.argv[2:])
env = preflight(cfg, comm.Get_rank() == 0)
state, rt, code = start(cfg, comm, env, build_policy(cfg, env))
print(f"rank {comm.Get_rank()} iteration {state.iteration} theta {mpi.theta_digest(state.theta)} "
      f"obs {mpi.theta_digest(state.obs_stats.sum)} count {state.obs_stats.count!r}", flush=True)
comm.Barrier()
