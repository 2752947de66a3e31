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


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (this one counts): staging and extraction folders carry their
    writer's pid, and only a dead writer's leftovers may be removed."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
