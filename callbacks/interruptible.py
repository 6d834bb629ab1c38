"""Work that the first Ctrl+C or SIGTERM stops at once (a validation), so that the checkpoint is saved now.

A validation generates for minutes; a signal that waited for its end lost the checkpoint to the user's second
Ctrl+C, or to the SIGKILL that ``docker stop`` and Slurm send a few seconds after their SIGTERM.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class WorkInterrupted(BaseException):
    """Raised by a signal handler inside a :meth:`Interruptible.region`. A BaseException, like KeyboardInterrupt, so
    that no ``except Exception`` on the way swallows it."""


class Interruptible:
    """``with Interruptible() as work:`` catches the stop of the work inside it: the block ends there and
    ``work.interrupted`` is set.

    A signal handler stops the work (raises :class:`WorkInterrupted`) only while it is in a :meth:`region`: the
    exception lands between any two bytecodes, so the regions hold what may be cut short (generating a batch of
    images), never what must not be left half done (restoring the RNG and the modules' modes afterwards).
    """

    regions = 0

    def __enter__(self) -> Interruptible:
        self.interrupted = False
        return self

    def __exit__(self, kind: Any, error: BaseException | None, traceback: Any) -> bool:
        self.interrupted = isinstance(error, WorkInterrupted)
        return self.interrupted

    @classmethod
    def stoppable(cls) -> bool:
        """Whether a signal handler may raise :class:`WorkInterrupted` now: inside a region."""
        return cls.regions > 0

    @classmethod
    @contextmanager
    def region(cls) -> Iterator[None]:
        """Work a signal may cut short; inside an ``Interruptible()`` block that catches the stop."""
        try:
            cls.regions += 1  # inside the try: once it counts, the finally takes it back
            yield
        finally:
            cls.regions -= 1
