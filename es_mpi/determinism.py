"""Pin the CPU kernels torch and MKL choose, so an episode's return does not depend on the
node that ran it.

torch (ATen) and MKL pick their kernels by instruction set at run time. Different kernels sum
in different orders, so on a cluster that mixes AVX2 and AVX-512 nodes the same perturbed
policy can act differently by a few ulps, a return can change, and the bitwise rank-count
invariance would silently depend on which node evaluated which pair. Capping every node at
the same instruction set makes them run the same kernels. Measured cost: docs/performance.md
(bench/cpu_pinning.py).

Set the variables yourself to choose otherwise (an empty value leaves a library free to pick:
`ATEN_CPU_CAPABILITY= MKL_CBWR= ONEDNN_MAX_CPU_ISA= python -m es_mpi.run ...`).
No torch, numpy or MPI imports here: `pin_cpu_kernels` must run before any of them.
"""
from __future__ import annotations

import os
import platform

# variable -> value on x86-64: the AVX2 kernels, which every AVX-512 CPU also runs
PINNED_X86 = {
    "ATEN_CPU_CAPABILITY": "avx2",  # torch's own vectorised kernels
    "MKL_CBWR": "AVX2",  # MKL's conditional numerical reproducibility branch (BLAS)
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN (convolutions)
}
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def pin_cpu_kernels(environ: dict = os.environ) -> dict[str, str]:
    """Set one thread per rank and (on x86-64) the AVX2 kernel caps unless already set;
    returns the settings in force. Call before numpy and torch are imported."""
    for var in THREAD_VARS:
        environ.setdefault(var, "1")  # one thread per rank
    if platform.machine().lower() in ("x86_64", "amd64"):
        for var, value in PINNED_X86.items():
            environ.setdefault(var, value)
    return {var: environ.get(var, "") for var in PINNED_X86}


def cpu_kernels() -> str:
    """What this process runs, e.g. 'x86_64 torch AVX2 MKL_CBWR=AVX2' (imports torch)."""
    import torch

    return (f"{platform.machine()} torch {torch.backends.cpu.get_cpu_capability()} "
            f"MKL_CBWR={os.environ.get('MKL_CBWR', '')}")
