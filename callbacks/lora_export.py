"""Write the LoRA in files for diffusers, ComfyUI and A1111/Forge, beside each checkpoint and at the end.

The same files from any checkpoint that ``train.py`` wrote, afterwards: ``likeness export CKPT``
(:mod:`callbacks.checkpoint_export`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from callbacks.export_facts import (
    check_lora_name,
    configured_learning_rate,
    kohya_ignored_modules,
    lora_file_stem,
    native_resolution,
    run_name,
    step_folder,
    training_settings,
)
from callbacks.lora_ema import active_ema, ema_weights
from callbacks.run_folders import checkpoint_dir, log_dir
from lora_files.kohya_lora import kohya_state_dict
from lora_files.lora_adapter import has_lora
from lora_files.lora_formats import export_lora


class LoraExport(L.Callback):
    """Export ``pl_module.unet`` / ``pl_module.text_encoder`` LoRA with :func:`export_lora`.

    Folders (each holds ``pytorch_lora_weights.safetensors``, ``<name>-step<NNNNNN>.safetensors`` and
    ``README.md``):

    * at every checkpoint save: ``<checkpoint dir>/lora/step<NNNNNN>/``, named as the step checkpoints are — the
      checkpoint dir is the first ``ModelCheckpoint``'s ``dirpath``, else ``<log dir>/checkpoints``;
    * at the end of training: ``<log dir>/lora/final/``.

    With EMA on (``LoraEMA``, ``ema.decay``) the files hold the EMA weights, as the checkpoints do, and the model
    card says so.

    The module needs ``unet`` (with a peft LoRA adapter), ``text_encoder`` (LoRA optional) and
    ``hparams.pretrained_model_name_or_path``; the datamodule, if any, ``hparams.resolution`` and
    ``captions`` (a list, a property or a method; used for kohya's tag counts and the model card).

    Args:
        name: LoRA name: the kohya file is ``<name>-step<NNNNNN>.safetensors`` and A1111's tag
            ``<lora:<name>-step<NNNNNN>:1>``; default: the run's logger name and version (``brad-v3``).
        on_checkpoint: Also export beside every checkpoint (not only at the end).
    """

    def __init__(self, name: str | None = None, on_checkpoint: bool = True) -> None:
        super().__init__()
        check_lora_name(name, "export.name")
        self.name = name
        self.on_checkpoint = on_checkpoint
        self._last_folder: Path | None = None
        self._name = name or ""
        self._started_at: float | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Fail at the start, not at the first checkpoint hours later, if the LoRA cannot be exported.
        if stage != "fit":
            return
        if trainer.is_global_zero:  # the logger's version is rank 0's; only rank 0 exports and saves
            self._name = self.name or run_name(trainer)
        if not has_lora(getattr(pl_module, "unet", None)):
            raise ValueError("LoraExport needs pl_module.unet with a peft LoRA adapter named 'default'")
        kohya_state_dict(pl_module.unet, getattr(pl_module, "text_encoder", None))
        if ignored := kohya_ignored_modules(pl_module.unet):
            rank_zero_warn(
                f"model.unet_target_modules puts LoRA on {', '.join(ignored)}: ComfyUI, A1111 and Forge load it, "
                "but kohya's sd-scripts ignore these modules without a word. Leave them out of the targets if the "
                "LoRA is meant for kohya's scripts."
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started_at = self._started_at or time.time()  # a resumed run keeps its first start

    def state_dict(self) -> dict[str, Any]:
        # Recorded in every checkpoint so that exporting one later names the files as training did.
        return {"name": self._name, "started_at": self._started_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Only the start time: on resume the run's own config (and so its name) wins.
        self._started_at = state_dict.get("started_at")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        folder = checkpoint_dir(trainer) / "lora" / step_folder(trainer.global_step)
        # last.ckpt and the step checkpoint are saved at the same step: export once.
        if self.on_checkpoint and folder != self._last_folder:
            self._export(trainer, pl_module, folder)
            self._last_folder = folder

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._export(trainer, pl_module, log_dir(trainer) / "lora" / "final")

    @rank_zero_only
    def _export(self, trainer: L.Trainer, pl_module: L.LightningModule, folder: Path) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        resolution = getattr(getattr(datamodule, "hparams", None), "resolution", None)
        if resolution is None:
            resolution = native_resolution(pl_module)
        groups = trainer.optimizers[0].param_groups if trainer.optimizers else [{}]
        ema = active_ema(trainer)
        settings = training_settings(
            getattr(pl_module, "hparams", None),
            getattr(datamodule, "hparams", None),
            precision=trainer.precision,
            max_steps=trainer.max_steps,
            learning_rate=configured_learning_rate(groups[0]),
            prediction_type=getattr(getattr(pl_module, "noise_scheduler", None), "config", {}).get("prediction_type"),
            seed=os.environ.get("PL_GLOBAL_SEED"),  # what seed_everything set
        ) | (ema.settings() if ema else {})
        with ema_weights(trainer):  # the EMA weights when EMA is on, as the checkpoint beside these files holds
            export_lora(
                folder,
                pl_module.unet,
                getattr(pl_module, "text_encoder", None),
                name=lora_file_stem(self._name, trainer.global_step),
                base_model=str(pl_module.hparams.pretrained_model_name_or_path),
                steps=trainer.global_step,
                resolution=resolution,
                captions=_captions(datamodule),
                metrics=_validation_metrics(trainer.callback_metrics),
                settings=settings,
                started_at=self._started_at,
            )
        rank_zero_info(f"LoRA exported to {folder}")


def _captions(datamodule: Any) -> list[str]:
    """The datamodule's training captions, or none when it has no (ready) ``captions``."""
    try:
        captions = getattr(datamodule, "captions", None)
        captions = captions() if callable(captions) else captions
    except (AttributeError, TypeError, RuntimeError):  # e.g. a property read before setup
        return []
    return [str(c) for c in captions or []]


def _validation_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The last logged validation metrics (``val...`` names) as floats."""
    out = {}
    for key, value in metrics.items():
        if key.startswith("val"):
            try:
                out[key] = float(value)
            except (TypeError, ValueError):
                continue
    return out
