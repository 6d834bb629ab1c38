"""Files every part of likeness writes the same way: atomically, and under the user's cache folder."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/likeness`` (``~/.cache/likeness``): caches shared by every run of this user."""
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "likeness"


def write_atomically(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place: never a torn ``path``.

    Same folder, so the rename is atomic (no copy across filesystems); on any error the temporary file is removed
    and an existing ``path`` is left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.partial"):  # left by a writer that was killed (SIGKILL)
        stale.unlink(missing_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
    try:
        with open(partial, "xb") as file:  # the usual permissions (umask), unlike mkstemp's 0600
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
