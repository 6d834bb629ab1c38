"""Lightning's learning-rate monitor, one point per optimizer step also with gradient accumulation."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor


class StepLearningRateMonitor(LearningRateMonitor):
    """Logs ``train/lr/*`` once per optimizer step: Lightning's logs before every micro-batch, so with
    ``accumulate_grad_batches 2`` each step had two points at one x (TensorBoard drew them as a zig-zag over the
    same step). The rate logged is the one the coming step applies, read at its first micro-batch.

    Args: as :class:`~lightning.pytorch.callbacks.LearningRateMonitor`'s.
    """

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx % max(1, trainer.accumulate_grad_batches) == 0:
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
