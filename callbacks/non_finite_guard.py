"""Stop (or skip the step) when the loss or a gradient turns NaN or infinite; never save such weights (issue #8).

A learning rate far too high, a huge ``noise_offset`` or an fp16 overflow make the loss NaN; every step after it
writes NaN into the LoRA weights, and without this guard every later checkpoint and LoRA file would be NaN while
the run ends with exit code 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_modules.finite import NonFiniteError, check_finite


def _total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    # One fused kernel family for all LoRA gradients (get_total_norm: torch >= 2.6); NaN/inf anywhere shows in it.
    if hasattr(torch.nn.utils, "get_total_norm"):
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


class NonFiniteGuard(L.Callback):
    """Watches each step's loss and gradients for NaN and infinity.

    By default training stops with an error naming the first bad step. The check records the step on the device
    and waits for it only every ``check_every_n_steps`` steps (no GPU sync per step); it always waits before a
    checkpoint is written, so none holds non-finite weights, and the LoRA export refuses them too.

    Args:
        skip_steps: skip the optimizer update of a step whose loss or gradients are not finite (with a warning)
            and go on, instead of stopping. Checks every step (one GPU sync each).
        max_skipped_steps: with ``skip_steps``, stop anyway after this many skipped steps in a row.
        check_every_n_steps: how often the stopping check waits for the device.
    """

    def __init__(self, skip_steps: bool = False, max_skipped_steps: int = 10, check_every_n_steps: int = 10) -> None:
        self.skip_steps = skip_steps
        self.max_skipped_steps = max_skipped_steps
        self.check_every_n_steps = max(1, check_every_n_steps)
        self._loss_finite: torch.Tensor | None = None
        self._first_bad: torch.Tensor | None = None  # 1-based optimizer step, -1 while all were finite
        self._skipped_in_a_row = 0

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all()
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        # fp16's GradScaler skips overflowing steps itself (and lowers its scale): only the loss counts there.
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        finite = torch.isfinite(_total_norm([p.grad.detach() for p in params])) if params and not scaled else None
        if self._loss_finite is not None:
            finite = self._loss_finite if finite is None else finite & self._loss_finite.to(finite.device)
        self._loss_finite = None
        if finite is None:
            return
        step = trainer.global_step + 1
        if self.skip_steps:
            if bool(finite):
                self._skipped_in_a_row = 0
                return
            self._skipped_in_a_row += 1
            if self._skipped_in_a_row > self.max_skipped_steps:
                raise NonFiniteError(self._message(trainer, step - self.max_skipped_steps, skipped=True))
            for p in params:
                p.grad = None  # torch optimizers leave parameters without a gradient untouched
            rank_zero_warn(f"Step {step}: the loss or a gradient is NaN or infinite; the update is skipped.")
            return
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=finite.device)
        first_bad = torch.full_like(self._first_bad, step)
        self._first_bad = torch.where((self._first_bad < 0) & ~finite, first_bad, self._first_bad)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step % self.check_every_n_steps == 0:
            self.check(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # Raising here stops the save before the file is opened: earlier checkpoints stay the good ones.
        self.check(trainer)
        state = checkpoint.get("state_dict", {})
        trainable = getattr(pl_module, "trainable_names", None)
        keep = trainable() if callable(trainable) else set(state)  # frozen weights come from the base model
        check_finite(
            {name: tensor for name, tensor in state.items() if name in keep},
            f"The checkpoint at step {trainer.global_step}",
            "It was not written. Lower the learning rate or check the settings that feed the loss.",
        )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(trainer)

    def check(self, trainer: L.Trainer) -> None:
        """Wait for the device and raise :class:`NonFiniteError` if a step so far was not finite."""
        if self._first_bad is not None and (step := int(self._first_bad)) > 0:
            raise NonFiniteError(self._message(trainer, step))

    def _message(self, trainer: L.Trainer, step: int, skipped: bool = False) -> str:
        # Lightning sets last_model_path before it saves, and this guard may have stopped that very save.
        last = getattr(trainer.checkpoint_callback, "last_model_path", "") or ""
        last = last if last and Path(last).is_file() else "none yet"
        causes = (
            "Usual causes: a learning rate far too high (model.optimizer, model.text_encoder_lr), a large "
            "model.noise_offset, or fp16 overflow (use trainer.precision bf16-mixed)."
        )
        if skipped:
            return (
                f"Training stopped: {self.max_skipped_steps + 1} steps in a row from step {step} had a NaN or "
                f"infinite loss or gradient (nan_guard.max_skipped_steps {self.max_skipped_steps}). Their updates "
                f"were skipped, so the weights are still finite; checkpoints are too (last saved: {last}). {causes} "
                "Resume from a checkpoint with a fix."
            )
        return (
            f"Training stopped: step {step} had a NaN or infinite loss or gradient, so the LoRA weights are no longer "
            f"usable. Checkpoints written before step {step} are finite (last saved: {last}). {causes} Resume from "
            "an earlier checkpoint with a fix, or set nan_guard.skip_steps true to skip such steps."
        )
