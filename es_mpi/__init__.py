"""es_mpi: OpenAI-ES with common random numbers over MPI (see README.md)."""

__version__ = "0.2.0"
