"""Write the LoRA in files for diffusers, ComfyUI and A1111/Forge, beside each checkpoint and at the end."""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Number
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from lightning_modules.lora_formats import export_lora, has_lora, kohya_state_dict


class LoraExport(L.Callback):
    """Export ``pl_module.unet`` / ``pl_module.text_encoder`` LoRA with :func:`export_lora`.

    Folders (each holds ``pytorch_lora_weights.safetensors``, ``<name>.safetensors`` and ``README.md``):

    * at every checkpoint save: ``<checkpoint dir>/lora/step-<global step>/`` — the checkpoint dir is the
      first ``ModelCheckpoint``'s ``dirpath``, else ``<log dir>/checkpoints``;
    * at the end of training: ``<log dir>/lora/final/``.

    The module needs ``unet`` (with a peft LoRA adapter), ``text_encoder`` (LoRA optional) and
    ``hparams.pretrained_model_name_or_path``; the datamodule, if any, ``hparams.resolution`` and
    ``captions`` (a list, a property or a method; used for kohya's tag counts and the model card).

    Args:
        name: LoRA name: kohya file stem and the ``<lora:name:1>`` tag of A1111.
        on_checkpoint: Also export beside every checkpoint (not only at the end).
    """

    def __init__(self, name: str = "likeness_lora", on_checkpoint: bool = True) -> None:
        super().__init__()
        self.name = name
        self.on_checkpoint = on_checkpoint

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Fail at the start, not at the first checkpoint hours later, if the LoRA cannot be exported.
        if stage != "fit":
            return
        if not has_lora(getattr(pl_module, "unet", None)):
            raise ValueError("LoraExport needs pl_module.unet with a peft LoRA adapter named 'default'")
        kohya_state_dict(pl_module.unet, getattr(pl_module, "text_encoder", None))

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self.on_checkpoint:
            self._export(trainer, pl_module, self._checkpoint_dir(trainer) / "lora" / f"step-{trainer.global_step}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._export(trainer, pl_module, self._log_dir(trainer) / "lora" / "final")

    @staticmethod
    def _log_dir(trainer: L.Trainer) -> Path:
        return Path(trainer.log_dir or trainer.default_root_dir)

    def _checkpoint_dir(self, trainer: L.Trainer) -> Path:
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
        return Path(dirpath) if dirpath else self._log_dir(trainer) / "checkpoints"

    @rank_zero_only
    def _export(self, trainer: L.Trainer, pl_module: L.LightningModule, folder: Path) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        resolution = getattr(getattr(datamodule, "hparams", None), "resolution", None)
        if resolution is None:
            resolution = pl_module.unet.config.sample_size * 8  # the VAE's 8x: the model's native size
        export_lora(
            folder,
            pl_module.unet,
            getattr(pl_module, "text_encoder", None),
            name=self.name,
            base_model=str(pl_module.hparams.pretrained_model_name_or_path),
            steps=trainer.global_step,
            resolution=resolution,
            captions=_captions(datamodule),
            metrics=_validation_metrics(trainer.callback_metrics),
            settings=_settings(trainer, pl_module, datamodule),
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


def _settings(trainer: L.Trainer, pl_module: L.LightningModule, datamodule: Any) -> dict[str, Any]:
    """Scalar hyperparameters of module and datamodule, plus what the trainer knows (lr, max steps)."""

    def scalars(hparams: Any) -> dict[str, Any]:
        items = dict(hparams or {}).items()
        return {k: v for k, v in items if isinstance(v, str | bool | Number) or (isinstance(v, list) and v)}

    settings = scalars(getattr(pl_module, "hparams", None))
    settings |= {k: v for k, v in scalars(getattr(datamodule, "hparams", None)).items() if k not in settings}
    settings.pop("pretrained_model_name_or_path", None)  # the card lists it as the base model
    settings["precision"] = str(trainer.precision)
    if trainer.max_steps and trainer.max_steps > 0:
        settings["max_steps"] = trainer.max_steps
    if trainer.optimizers:
        settings["learning_rate"] = (
            trainer.optimizers[0].param_groups[0].get("initial_lr") or (trainer.optimizers[0].param_groups[0]["lr"])
        )
    return settings
