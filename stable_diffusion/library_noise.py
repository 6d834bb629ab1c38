"""What the libraries print while they are imported or load weights and that a user cannot act on (issue #10).

transformers' "requires torchvision; falling back to …Pil" notices (likeness does not use torchvision, and with the
pinned torch its import fails: installing it as the notice suggests would break the install), its weight-loading
bars for a few-second load, and Lightning's product tips. The ``likeness`` command and the demo's model builder
call :func:`quiet_library_noise` before they import diffusers; it acts on the whole process, so importing either
quiets a notebook or a test session too.
"""

from __future__ import annotations

import logging

NOISE = ("requires torchvision", "💡 Tip:")


class DropMessages(logging.Filter):
    """Drops log records whose message contains one of ``fragments``."""

    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def quiet_library_noise() -> None:
    """Silence library messages that need no action; idempotent."""
    import transformers.utils.logging as transformers_logging

    transformers_logging.disable_progress_bar()
    noise = DropMessages(*NOISE)
    for name in ("transformers", "lightning.pytorch", "lightning.fabric", "lightning"):
        logger = logging.getLogger(name)
        for handler in [*logger.handlers, logger]:
            if not any(isinstance(f, DropMessages) for f in handler.filters):
                handler.addFilter(noise)
