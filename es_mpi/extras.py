"""Optional dependencies: a missing one is a ConfigError naming the extra that installs it,
raised before any work (not a ModuleNotFoundError after it)."""
from __future__ import annotations

import importlib

from .config import ConfigError

def install_hint(extra: str) -> str:
    return (f"install the '{extra}' extra: pip install -e \".[{extra}]\" in the es_mpi "
            f"checkout (or pip install 'es_mpi[{extra}]')")


def require(module: str, extra: str, what: str):
    """The imported `module`; ConfigError naming `what` needs it and the extra if missing."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{what} needs the package '{module.split('.')[0]}'; "
                          f"{install_hint(extra)}") from None
