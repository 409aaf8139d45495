"""Under mpiexec: resume-style VBN setup from a checkpoint's extras (argv[1]).

The checkpoint's reference batch is replaced by a recognisably different one (reversed batch
order) before prepare_vbn, so a policy that ends up with it was restored, not recollected.
Every rank prints its reference digest and its action logits' digest for the test to compare.
"""
import sys

import numpy as np
import torch

from es_mpi import comm as mpi
from es_mpi.checkpoint import load_checkpoint
from es_mpi.config import loads
from es_mpi.runtime import build_runtime, prepare_vbn

comm = mpi.world()
state, text = load_checkpoint(sys.argv[1])
cfg = loads(text)
saved = state.extras["vbn_reference"]
state.extras["vbn_reference"] = np.ascontiguousarray(saved[::-1])
rt = build_runtime(cfg, comm)
rt.policy.set_theta(state.theta)
prepare_vbn(cfg, comm, rt, state)
enc = rt.policy.encoder
used = enc._reference.numpy()
assert np.array_equal(used, saved[::-1]), "reference batch not taken from the checkpoint"
logits = rt.policy(torch.from_numpy(saved[:2])).numpy()
print(f"rank {comm.Get_rank()} ref {mpi.theta_digest(used)} "
      f"logits {mpi.theta_digest(logits)}", flush=True)
