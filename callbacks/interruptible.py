"""Work that the first Ctrl+C or SIGTERM stops at once (a validation), so that the checkpoint is saved now.

A validation generates for minutes; a signal that waited for its end lost the checkpoint to the user's second
Ctrl+C, or to the SIGKILL that ``docker stop`` and Slurm send a few seconds after their SIGTERM.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class WorkInterrupted(BaseException):
    """Raised by a signal handler inside :class:`Interruptible` work. A BaseException, like KeyboardInterrupt, so
    that no ``except Exception`` on the way swallows it."""


class Interruptible:
    """``with Interruptible() as work:`` runs work that a signal handler may stop by raising :class:`WorkInterrupted` (when
    :meth:`stoppable`): the block ends
    there and ``work.interrupted`` is set.

    The exception arrives between any two bytecodes of the work, so what must not be left half done (restoring
    the RNG and the modules' modes after generating) runs :meth:`shielded`: a signal there lets it finish, and the
    work ends normally; the trainer stops after it all the same.
    """

    active = 0
    shields = 0

    def __enter__(self) -> Interruptible:
        Interruptible.active += 1
        self.interrupted = False
        return self

    def __exit__(self, kind: Any, error: BaseException | None, traceback: Any) -> bool:
        Interruptible.active -= 1
        self.interrupted = isinstance(error, WorkInterrupted)
        return self.interrupted

    @classmethod
    def stoppable(cls) -> bool:
        """Whether a signal handler may raise :class:`WorkInterrupted` now: work runs, outside a shielded part."""
        return cls.active > 0 and not cls.shields

    @classmethod
    @contextmanager
    def shielded(cls) -> Iterator[None]:
        """A part of the work that a signal does not cut short."""
        cls.shields += 1
        try:
            yield
        finally:
            cls.shields -= 1
