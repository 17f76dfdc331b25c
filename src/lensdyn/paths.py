"""Where lensdyn keeps what it can rebuild: dequantised weights, the command line's option table."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where lensdyn caches: ``$LENSDYN_CACHE``, else ``$XDG_CACHE_HOME/lensdyn``, else ``~/.cache/lensdyn``."""
    if os.environ.get("LENSDYN_CACHE"):
        return Path(os.environ["LENSDYN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lensdyn"
