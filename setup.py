"""Builds the optional C kernel of the ES update's noise sum (es_mpi/_noise_sum.c).

Everything else is in setup.cfg. Without a working C compiler the build prints a warning and
es_mpi installs anyway; es.weighted_noise_sum then runs its NumPy form (the same bits, slower).
"""
from setuptools import Extension, setup

# -ffp-contract=off: no fused multiply-add, so every product is rounded as NumPy rounds it;
# -fno-fast-math: no reassociation (the sum is in a fixed order of eps per coordinate).
KERNEL = Extension("es_mpi._noise_sum", ["es_mpi/_noise_sum.c"], optional=True,
                   extra_compile_args=["-O3", "-ffp-contract=off", "-fno-fast-math"])

setup(ext_modules=[KERNEL])
