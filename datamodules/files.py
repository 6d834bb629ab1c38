"""Files every part of likeness writes the same way: atomically, and under the user's cache folder."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/likeness`` (``~/.cache/likeness``): caches shared by every run of this user."""
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "likeness"


def file_mode(folder: Path) -> int:
    """The permissions a new file gets from the umask (``0o644`` with the usual ``022``): what ``open`` gives,
    unlike ``mkstemp``'s or safetensors' ``0o600``, which a ComfyUI or web server of another user cannot read.
    Read off a probe file in ``folder``: setting the umask to read it would race with other threads' files."""
    probe = folder / f".mode-{uuid.uuid4().hex[:8]}"
    probe.touch(exist_ok=False)
    try:
        return probe.stat().st_mode & 0o777
    finally:
        probe.unlink()


def cannot_write(folder: Path) -> str | None:
    """Why no file can be created in ``folder`` (made if missing): ``"Read-only file system"``, ``"it is a file,
    not a folder"``…; None if one can. Asked before slow work that ends by writing there, which may still fail:
    the folders made to ask are removed again (a failed command leaves no empty folder behind)."""
    if folder.exists() and not folder.is_dir():
        return "it is a file, not a folder"
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        file_mode(folder)  # creates and removes a probe file
    except OSError as err:
        return err.strerror or str(err)
    finally:
        remove_empty(made)
    return None


def remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (innermost first) while they are empty: what a command made and left unused."""
    for path in folders:
        try:
            path.rmdir()
        except OSError:  # not empty (or never made): it and the folders above it stay
            break


def write_atomically(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place: never a torn ``path``.

    Same folder, so the rename is atomic (no copy across filesystems); on any error the temporary file is removed
    and an existing ``path`` is left as it was. The writer holds a lock on its temporary file until the rename, so
    another process writing the same cache entry at the same time never removes it as a leftover.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.partial"):  # left by a writer that was killed (SIGKILL)
        if _abandoned(stale):
            stale.unlink(missing_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
    try:
        with open(partial, "xb") as file:  # the usual permissions (umask), unlike mkstemp's 0600
            if fcntl is not None:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
            if fcntl is not None:
                os.replace(partial, path)  # still locked: POSIX renames an open file
        if fcntl is None:
            os.replace(partial, path)  # Windows renames no open file
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _abandoned(partial: Path) -> bool:
    """A temporary file of :func:`write_atomically` whose writer is gone: nobody holds its lock (a writer takes it
    right after creating the file, hence the minute's grace). Without ``fcntl`` (Windows): an hour old."""
    try:
        age = time.time() - partial.stat().st_mtime
        if fcntl is None or age < 60:
            return age > 3600
        fd = os.open(partial, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:  # locked: its writer is alive
        return False
    finally:
        os.close(fd)
