"""How the LoRA weights train: the optimizer over one parameter group per model, diffusers' learning-rate schedule,
and the configured learning rates put back on resume (the config wins over the checkpoint; see train.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from diffusers.optimization import get_scheduler
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn

from lightning_modules.mixed_precision import fused_adam

LRScheduler = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]


@dataclass(frozen=True)
class LoraOptimization:
    """The optimizer and schedule settings of a run (``model.optimizer``, ``model.text_encoder_lr``,
    ``model.lr_scheduler``, ``model.lr_warmup_steps``, ``model.lr_num_cycles``)."""

    optimizer_factory: OptimizerCallable
    lr_scheduler: LRScheduler
    lr_warmup_steps: int
    lr_num_cycles: int
    text_encoder_lr: float | None

    def param_groups(self, unet: torch.nn.Module, text_encoder: torch.nn.Module | None) -> list[dict[str, Any]]:
        """Trainable parameters only, one group per model (the text encoder may have its own lr); ``text_encoder``
        is ``None`` when it does not train."""
        groups: list[dict[str, Any]] = [{"params": [p for p in unet.parameters() if p.requires_grad], "name": "unet"}]
        if text_encoder is not None:
            te_group = {"params": [p for p in text_encoder.parameters() if p.requires_grad], "name": "te"}
            if self.text_encoder_lr is not None:
                te_group["lr"] = self.text_encoder_lr
            groups.append(te_group)
        return groups

    def schedule(self, total_steps: int, optimizer: torch.optim.Optimizer | None = None):
        """diffusers' schedule for a run of ``total_steps``: the scheduler, or its LR factor by step without one."""
        probe = optimizer or torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        scheduler = get_scheduler(
            self.lr_scheduler,
            optimizer=probe,
            num_warmup_steps=self.lr_warmup_steps,
            num_training_steps=total_steps,
            num_cycles=self.lr_num_cycles,
        )
        return scheduler if optimizer is not None else scheduler.lr_lambdas[0]

    def configure(self, groups: list[dict[str, Any]], total_steps: int, fuse: bool = True) -> dict[str, Any]:
        """What ``configure_optimizers`` returns: the optimizer over ``groups`` (Adam/AdamW fused on a GPU when
        ``fuse``), stepped by the schedule every optimizer step."""
        optimizer = self.optimizer_factory(groups)
        optimizer = fused_adam(optimizer) if fuse else optimizer
        scheduler = self.schedule(total_steps, optimizer)
        # "train/lr": LearningRateMonitor logs train/lr/unet and train/lr/te, beside the loss in TensorBoard.
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"},
        }

    def restore_configured_lrs(
        self,
        groups: list[dict[str, Any]],
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LambdaLR,
        planned: int | None,
        total: int,
    ) -> None:
        """After a resume: the configured base LRs of ``groups`` into the restored ``optimizer`` and ``scheduler``,
        and the LR at the resumed step recomputed; a warning when the run's ``total`` steps stretch the schedule
        that the checkpoint's run ``planned``."""
        configured = [g["lr"] for g in self.optimizer_factory(groups).param_groups]
        for i, (group, lr) in enumerate(zip(optimizer.param_groups, configured, strict=True)):
            group["initial_lr"] = scheduler.base_lrs[i] = lr
            group["lr"] = lr * scheduler.lr_lambdas[i](scheduler.last_epoch)
        if planned and planned != total and self.lr_scheduler != "constant":
            # The schedule is a function of the run's length: extending a run stretches it (issue #8). Say so.
            step, lr = scheduler.last_epoch, configured[0]
            rank_zero_warn(
                f"This run trains {total} steps; the checkpoint's run planned {planned}. The {self.lr_scheduler}"
                f" learning-rate schedule now spans {total} steps: at step {step} the learning rate is "
                f"{lr * self.schedule(total)(step):.3g} (the old plan had {lr * self.schedule(planned)(step):.3g})."
            )


def captures_cuda_graphs(compile_mode: str | None, device: torch.device) -> bool:
    """``torch.compile`` in ``compile_mode`` records CUDA graphs on ``device`` (inductor records none on a CPU)."""
    return compile_mode in ("reduce-overhead", "max-autotune") and device.type == "cuda"


def zero_grad(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], keep_buffers: bool) -> None:
    """Zero the gradients before a step's first backward pass; with ``keep_buffers`` into tensors of their own.

    A compiled block's backward writes the LoRA gradients into CUDA graph memory that the next replay reuses, and
    autograd keeps that tensor as ``.grad``: accumulated into after the next micro-batch's forward, it would have
    been overwritten (torch's cudagraph trees stop with an error). Buffers allocated here, outside the graphs, are
    added into instead and zeroed in place. One backward a step needs none: the optimizer reads ``.grad`` first.
    """
    if not keep_buffers:
        optimizer.zero_grad()
        return
    optimizer.zero_grad(set_to_none=False)
    for param in params:
        if param.grad is None:  # the first step, after a validation's zero_grad, or a step the NaN guard skipped
            param.grad = torch.zeros_like(param)
