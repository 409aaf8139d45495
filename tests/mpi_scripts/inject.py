"""Run `python -m es_mpi.run ARGS` with a fault injected on one rank (for tests).

    inject.py raise RANK ITERATION JOB [overrides]   -> RuntimeError in an episode on RANK
    inject.py diverge RANK ITERATION JOB [overrides] -> RANK's theta update is nudged
    inject.py setup RANK 0 JOB [overrides]           -> OSError while RANK makes its env
"""
import runpy
import sys

import numpy as np

from es_mpi import comm as mpi
from es_mpi import envs, es, rollout

mode, bad_rank, bad_iter = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rank = mpi.world().Get_rank()
calls = {"update": 0}

if mode == "raise" and rank == bad_rank:
    real_episode = rollout.run_episode

    def failing_episode(*args, **kwargs):
        if calls["update"] >= bad_iter:
            raise RuntimeError(f"injected failure on rank {rank}")
        return real_episode(*args, **kwargs)

    rollout.run_episode = failing_episode

if mode == "setup" and rank == bad_rank:
    def failing_make_env(*args, **kwargs):
        raise OSError(f"injected set-up failure on rank {rank}")

    envs.make_env = failing_make_env

real_update = es.es_update


def counting_update(theta, grad, state, cfg):
    calls["update"] += 1
    theta, state = real_update(theta, grad, state, cfg)
    if mode == "diverge" and rank == bad_rank and calls["update"] > bad_iter:
        theta = theta + np.float32(1e-3)
    return theta, state


es.es_update = counting_update
sys.argv = ["es_mpi.run", *sys.argv[4:]]
runpy.run_module("es_mpi.run", run_name="__main__", alter_sys=True)
