"""Checkpoints that are whole or absent: written beside their final name, then renamed into place (issue #8).

Lightning's own writer stages a checkpoint in ``TMPDIR`` and copies it over, across filesystems, onto its final
name: a kill during the copy left ``last.ckpt`` at 0 bytes (the previous good one gone) and a full disk left
partial ``step*.ckpt`` files. A rename within one folder is atomic: readers see the old file or the new one.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from datamodules.files import write_atomically


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (full disk, no permission); earlier files are intact."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves go through a temporary file in the checkpoint's own folder."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote filesystems: Lightning's own way
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        try:
            write_atomically(path, buffer.getbuffer())
        except OSError as err:
            raise CheckpointWriteError(
                f"Could not write checkpoint {path.name} in {path.parent}: {err.strerror or err}. Free space there "
                "(or point trainer.logger's save_dir elsewhere) and resume from the last checkpoint; every "
                "checkpoint written before this one is intact."
            ) from err
