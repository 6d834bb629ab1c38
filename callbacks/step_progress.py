"""A training bar that counts optimizer steps to ``max_steps``, with img/s and ETA (issue #10), and does not make the
GPU wait every step (issue #9)."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """``train 340/2000 [02:10<10:35, loss=0.113, img/s=5.2]``: one bar for the whole run, not one per epoch.

    Lightning's default bar counts the batches of each epoch (``Epoch 14/-2 4/4``), meaningless for a run planned
    in steps over a small photo folder. This one counts optimizer steps; a resumed run starts at its step and its
    ETA comes from the steps trained since.

    Reading the loss for the bar copies it from the GPU, which waits for the step to finish: drawn every step, the
    CPU could never queue the next step while the GPU works on this one (issue #9). So the bar redraws at most every
    ``refresh_seconds``, and the steps in between run without a wait. The loss is read only then: Lightning turns
    every metric logged with ``prog_bar=True`` into a number after every step, drawn or not, so
    :class:`LoRADiffusion` logs ``train/loss`` without it.

    img/s counts training alone: each step is timed from its batch start to this bar's ``on_train_batch_end``,
    which ``train.py`` puts before the other callbacks' (validation, checkpoints), so their pauses are not in it.
    Between redraws those times are the CPU's (the GPU may still be behind); each redraw waits for the GPU before
    its step's time is taken, so a window of whole redraw intervals measures what the GPU did.

    Args:
        refresh_rate: redraw only on steps that are a multiple of this.
        refresh_seconds: and at most once per this many seconds (the first and the last step always draw).
        window: redraw intervals the img/s average runs over.
    """

    def __init__(self, refresh_rate: int = 1, refresh_seconds: float = 0.5, window: int = 4) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.refresh_seconds = refresh_seconds
        self._intervals: deque[tuple[int, float]] = deque(maxlen=max(1, window))  # (steps, training seconds)
        self._steps = 0  # since the last redraw
        self._seconds = 0.0
        self._batch_started = 0.0
        self._last_drawn: float | None = None
        self._images_per_step = 1
        self._counted_step = 0  # the optimizer step the last batch end belonged to

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        bar.initial = bar.n = trainer.global_step
        bar.set_description("train")
        batch_size = getattr(getattr(trainer.datamodule, "hparams", None), "batch_size", None) or 1
        self._images_per_step = batch_size * trainer.world_size * trainer.accumulate_grad_batches
        self._counted_step = trainer.global_step

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        pass  # one bar for the run: no reset per epoch

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self._batch_started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, idx) -> None:
        if trainer.global_step == self._counted_step:  # a micro-batch before the step's last: its time counts
            self._seconds += time.perf_counter() - self._batch_started
            return
        self._counted_step = trainer.global_step
        bar = self.train_progress_bar
        draw = bar is not None and not bar.disable and self._due(trainer, time.perf_counter())
        metrics = self._drawn_metrics(trainer, pl_module, outputs) if draw else {}  # waits for the GPU: then the time
        now = time.perf_counter()
        self._steps += 1
        self._seconds += now - self._batch_started
        if not draw:
            return
        self._intervals.append((self._steps, self._seconds))
        self._steps, self._seconds, self._last_drawn = 0, 0.0, now
        bar.n = trainer.global_step
        bar.set_postfix(self._with_speed(metrics), refresh=True)

    def _due(self, trainer: L.Trainer, now: float) -> bool:
        step, total = trainer.global_step, self.train_progress_bar.total
        if not self._should_update(step, total):
            return False
        first, last = self._last_drawn is None, total is not None and step >= total
        return first or last or now - self._last_drawn >= self.refresh_seconds

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass

    def images_per_second(self) -> float | None:
        """Training images per second over the last ``window`` redraw intervals; ``None`` before the first."""
        steps = sum(n for n, _ in self._intervals)
        seconds = sum(s for _, s in self._intervals)
        return self._images_per_step * steps / seconds if steps and seconds > 0 else None

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        return self._with_speed(super().get_metrics(trainer, pl_module))

    def _drawn_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any) -> dict[str, Any]:
        """The bar's metrics with the step's loss: the ``train/loss`` the module logged (without ``prog_bar``:
        Lightning would read a progress-bar metric from the GPU after every step, drawn or not), else the step's
        output."""
        metrics = super().get_metrics(trainer, pl_module)
        logged = trainer.callback_metrics.get("train/loss")
        if isinstance(logged, torch.Tensor) and logged.numel() == 1:
            # With gradient accumulation what TensorBoard gets: LoRADiffusion logs the step's mean over its
            # micro-batches (StepMean), where the output is the last micro-batch's alone.
            metrics.setdefault("train/loss", logged.item())
            return metrics
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            # Lightning hands over the loss it backpropagates: divided by the micro-batches of a step.
            scale = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
            metrics.setdefault("train/loss", loss.item() * scale)
        return metrics

    def _with_speed(self, metrics: dict[str, Any]) -> dict[str, Any]:
        metrics.pop("v_num", None)  # the run folder's number, not a measurement
        if (speed := self.images_per_second()) is not None:
            metrics["img/s"] = f"{speed:.3g}"
        return metrics
