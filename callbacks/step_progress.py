"""A training bar that counts optimizer steps to ``max_steps``, with img/s and ETA (issue #10)."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """``train 340/2000 [02:10<10:35, loss=0.113, img/s=5.2]``: one bar for the whole run, not one per epoch.

    Lightning's default bar counts the batches of each epoch (``Epoch 14/-2 4/4``), meaningless for a run planned
    in steps over a small photo folder. This one counts optimizer steps; a resumed run starts at its step and its
    ETA comes from the steps trained since. img/s is measured over the last steps' training alone (validation
    pauses are not in it); the ETA includes them, as the run will.

    Args:
        refresh_rate: redraw every N steps.
        window: steps the img/s average runs over.
    """

    def __init__(self, refresh_rate: int = 1, window: int = 20) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self._durations: deque[float] = deque(maxlen=window)
        self._batch_started = 0.0
        self._images_per_step = 1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        bar.initial = bar.n = trainer.global_step
        bar.set_description("train")
        batch_size = getattr(getattr(trainer.datamodule, "hparams", None), "batch_size", None) or 1
        self._images_per_step = batch_size * trainer.world_size * trainer.accumulate_grad_batches

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        pass  # one bar for the run: no reset per epoch

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self._batch_started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, idx) -> None:
        self._durations.append(time.perf_counter() - self._batch_started)
        bar = self.train_progress_bar
        if bar is None or bar.disable or not self._should_update(trainer.global_step, bar.total):
            return
        bar.n = trainer.global_step
        bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=True)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the run folder's number, not a measurement
        if self._durations:
            per_step = sum(self._durations) / len(self._durations)
            metrics["img/s"] = f"{self._images_per_step / per_step:.3g}"
        return metrics
