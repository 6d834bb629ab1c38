"""An exponential moving average (EMA) of the LoRA weights, used for validation, checkpoints and the LoRA files.

SimpleTuner, OneTrainer and ai-toolkit offer it; an averaged LoRA is usually smoother than the last step's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_modules.finite import check_finite


class LoraEMA(L.Callback):
    """Keeps ``ema = d * ema + (1 - d) * w`` of every trainable tensor after each optimizer step.

    Only the trainable (LoRA) tensors are averaged, in a float32 shadow copy. Lightning's own
    ``WeightAveraging``/``EMAWeightAveraging`` would fit the formula, but its ``AveragedModel`` deep-copies the whole
    LightningModule: here that is the frozen SD1.5 (VAE, text encoder, UNet), about 4 GB more on the GPU to average
    a LoRA of a few MB.

    What uses the EMA weights when it is on:

    * checkpoints (``last.ckpt``, step checkpoints, ``best_identity.ckpt``): their ``state_dict`` holds the EMA, so
      ``validate``, ``test``, ``predict`` and ``likeness export`` of a checkpoint use it; the live weights go into
      this callback's state, and a resumed ``fit`` puts them back and continues exactly where it stopped (as
      Lightning's ``WeightAveraging.on_save_checkpoint`` does);
    * the LoRA files that ``LoraExport`` writes and the validation images during ``fit``, through
      :func:`ema_weights`, which swaps the EMA in for the duration and the live weights back afterwards.

    Training itself always steps the live weights: the EMA never changes the training trajectory.

    The decay of update ``n`` (optimizer step ``start_step + n``) is ``decay``, or with ``warmup``
    ``min(decay, (1 + n) / (10 + n))`` (diffusers' ``EMAModel.get_decay``, which counts ``n`` from one step later):
    early updates average over few steps, so the initial LoRA (B = 0: no change to the model at all) does not linger
    in the average of a short run (0.999 ** 2000 = 0.14 of it would after 2000 steps without warmup). With warmup the
    decay reaches ``decay`` after ``(10 * decay - 1) / (1 - decay)`` updates (0.999: about 9000; 0.99: 890).

    A checkpoint saved with ``ModelCheckpoint(save_weights_only=True)`` skips the callbacks' hooks and so holds the
    live weights.

    Args:
        decay: EMA decay per optimizer step; ``0`` turns EMA off (the default), otherwise in (0, 1), e.g. 0.999.
            The average spans about ``1 / (1 - decay)`` steps.
        start_step: up to this optimizer step the EMA copies the weights; it averages from the next step on.
        warmup: ramp the decay up as ``min(decay, (1 + n) / (10 + n))`` after ``start_step``.
        device: where the float32 shadow lives: ``same`` as the weights, or ``cpu`` (saves GPU memory, costs a copy
            of the LoRA from the GPU every step).
    """

    def __init__(
        self,
        decay: float = 0.0,
        start_step: int = 0,
        warmup: bool = True,
        device: Literal["same", "cpu"] = "same",
    ) -> None:
        if not (decay == 0 or 0 < decay < 1):  # also refuses NaN
            raise ValueError(f"ema.decay {decay}: give 0 (EMA off) or a number between 0 and 1, e.g. 0.999.")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"ema.start_step {start_step!r}: give a whole number of optimizer steps, 0 or more.")
        if device not in ("same", "cpu"):
            raise ValueError(f"ema.device {device!r}: give 'same' (where the weights are) or 'cpu'.")
        self.decay = float(decay)
        self.start_step = start_step
        self.warmup = bool(warmup)
        self.device = device
        self._named: list[tuple[str, torch.nn.Parameter]] = []  # the module's trainable tensors, in order
        self._shadow: list[torch.Tensor] | None = None  # float32 EMA of each; None when off or outside fit
        self._live: list[torch.Tensor] | None = None  # the live weights while the EMA is swapped in
        self._last_update_step = -1

    @property
    def enabled(self) -> bool:
        return self.decay > 0

    def decay_at(self, step: int) -> float:
        """The decay of the update after optimizer step ``step`` (1 for the first); 0: the EMA copies the weights."""
        n = step - self.start_step
        if n <= 0:
            return 0.0
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    def settings(self) -> dict[str, Any]:
        """The settings that make the exported weights what they are, for the model card."""
        return {"ema_decay": self.decay, "ema_start_step": self.start_step, "ema_warmup": self.warmup}

    # --- fit ----------------------------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.enabled:
            return
        # Started here, before anything else can ask for it (a baseline validation at train start); a resume
        # replaces it in on_load_checkpoint, and on_train_start moves it where it lives.
        self._bind(pl_module)
        with torch.no_grad():
            self._shadow = [p.detach().float().clone() for _, p in self._named]
        self._last_update_step = trainer.global_step

    def _bind(self, pl_module: L.LightningModule) -> None:
        self._named = [(name, p) for name, p in pl_module.named_parameters() if p.requires_grad]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._shadow is None:
            return
        self._bind(pl_module)  # after the strategy moved the module to its device
        self._shadow = [s.to(self._home(p)) for s, (_, p) in zip(self._shadow, self._named, strict=True)]
        self._last_update_step = trainer.global_step

    def _home(self, param: torch.Tensor) -> torch.device:
        return torch.device("cpu") if self.device == "cpu" else param.device

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._catch_up(trainer)

    def _catch_up(self, trainer: L.Trainer) -> None:
        """Update once per optimizer step. Under gradient accumulation ``global_step`` moves only every N batches;
        a consumer (validation, export, checkpoint) that runs before this callback's batch-end hook calls it too,
        so the order of the callbacks does not matter."""
        if self._shadow is not None and trainer.global_step > self._last_update_step:
            self._update(trainer.global_step)
            self._last_update_step = trainer.global_step

    @torch.no_grad()
    def _update(self, step: int) -> None:
        live = [p.detach() for _, p in self._named] if self._live is None else self._live
        live = [w.to(s.device, torch.float32) for w, s in zip(live, self._shadow, strict=True)]
        decay = self.decay_at(step)
        if decay == 0:
            torch._foreach_copy_(self._shadow, live)
        else:
            # ema + (1 - d) * (w - ema) = d * ema + (1 - d) * w: one fused kernel over all tensors.
            torch._foreach_lerp_(self._shadow, live, 1.0 - decay)

    # --- swapping the EMA in -----------------------------------------------------------------------------------

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The EMA weights in the module for the ``with`` block, the live ones (bit for bit) afterwards.

        A no-op when there is no EMA (off, or outside ``fit``: a loaded checkpoint's weights already are the EMA).
        """
        if self._shadow is None or self._live is not None:  # nothing to swap, or swapped in already
            yield
            return
        params = [p for _, p in self._named]
        with torch.no_grad():
            self._live = [p.detach().clone() for p in params]
            for p, s in zip(params, self._shadow, strict=True):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, w in zip(params, self._live, strict=True):
                    p.copy_(w)
            self._live = None

    # --- checkpoints ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self._shadow is None:
            return {}  # EMA off: the checkpoint is exactly the one a run without this callback writes
        live = self._live or [p.detach() for _, p in self._named]
        return {
            "decay": self.decay,
            "start_step": self.start_step,
            "warmup": self.warmup,
            # Cloned: the checkpoint is written after this returns, and the weights must be this step's.
            "live": {name: w.clone() for (name, _), w in zip(self._named, live, strict=True)},
        }

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self._shadow is None:
            return
        self._catch_up(trainer)
        state = checkpoint["state_dict"]
        for (name, p), s in zip(self._named, self._shadow, strict=True):
            if name in state:
                state[name] = s.to(p.dtype, copy=True)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # Lightning calls this after the module's state_dict (the EMA) was loaded into the module, so the live weights
        # put back here win. validate/test/predict keep the EMA: it is what the checkpoint stands for.
        if trainer.state.fn != TrainerFn.FITTING:
            return
        saved = (checkpoint.get("callbacks") or {}).get(self.state_key) or {}
        self._bind(pl_module)
        live = saved.get("live")
        if live is not None:
            missing = [name for name, _ in self._named if name not in live]
            if missing:
                raise KeyError(
                    f"The checkpoint's EMA state lacks {len(missing)} live LoRA tensor(s), e.g. {missing[0]}: it was "
                    "trained with other LoRA settings. Use the config it was trained with."
                )
            check_finite(live, "The checkpoint's live LoRA weights", "Use an earlier checkpoint.")
        state = checkpoint["state_dict"]
        with torch.no_grad():
            if self.enabled:
                # The checkpoint's state_dict is the EMA (or, without EMA in it, the weights to start the EMA from).
                self._shadow = [state[name].detach().float().clone() for name, _ in self._named]
                self._last_update_step = int(checkpoint.get("global_step", 0))
            if live is not None:
                for name, p in self._named:
                    p.copy_(live[name])
        if live is None and self.enabled:
            rank_zero_info("ema: the checkpoint was written without EMA; the EMA starts from its weights.")
        elif live is not None and not self.enabled:
            rank_zero_warn(
                f"The checkpoint holds an EMA of decay {saved.get('decay')}, and ema.decay is 0 now: training goes on "
                "from the live weights, without EMA."
            )


def active_ema(trainer: L.Trainer) -> LoraEMA | None:
    """The trainer's :class:`LoraEMA` if one is on and averaging (during ``fit``), else ``None``."""
    for callback in trainer.callbacks:
        if isinstance(callback, LoraEMA) and callback.enabled and callback._shadow is not None:
            return callback
    return None


def ema_weights(trainer: L.Trainer) -> AbstractContextManager[None]:
    """``with ema_weights(trainer):`` the module holds the EMA weights when a :class:`LoraEMA` is on; else a no-op.

    The LoRA files of ``LoraExport`` and the validation images of ``IdentityValidation`` are made inside it.
    """
    ema = active_ema(trainer)
    if ema is None:
        return nullcontext()
    ema._catch_up(trainer)  # this step's update, should this run before the callback's own batch-end hook
    return ema.applied()


def ema_settings(state: dict[str, Any] | None) -> dict[str, Any]:
    """:meth:`LoraEMA.settings` from the callback's state in a checkpoint; nothing when that run had no EMA."""
    state = state or {}
    if not state.get("decay", 0) > 0:
        return {}
    return {
        "ema_decay": state["decay"],
        "ema_start_step": state.get("start_step", 0),
        "ema_warmup": state.get("warmup"),
    }
