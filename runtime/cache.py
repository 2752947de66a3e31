"""Where smoledge keeps what it builds: ``$SMOLEDGE_CACHE_DIR`` or the user cache dir."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    env = os.environ.get("SMOLEDGE_CACHE_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("smoledge"))
