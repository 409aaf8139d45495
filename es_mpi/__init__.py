"""es_mpi: OpenAI-ES with common random numbers over MPI (see DESIGN.md)."""

__version__ = "0.1.0"
