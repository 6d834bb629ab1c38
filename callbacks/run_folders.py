"""Where a run's outputs go: the one place the callbacks ask for the log and checkpoint folders."""

from __future__ import annotations

from pathlib import Path

import lightning as L


def log_dir(trainer: L.Trainer) -> Path:
    """The run's log folder (``logs/<name>/version_N``), or the trainer's root without a logger."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def checkpoint_dir(trainer: L.Trainer) -> Path:
    """The ModelCheckpoint's folder, else ``<log dir>/checkpoints``."""
    dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
    return Path(dirpath) if dirpath else log_dir(trainer) / "checkpoints"
