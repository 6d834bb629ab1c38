"""Write the LoRA in files for diffusers, ComfyUI and A1111/Forge, beside each checkpoint and at the end.

The same files from any checkpoint that ``train.py`` wrote, afterwards::

    python -m callbacks.lora_export logs/likeness/version_0/checkpoints/last.ckpt [--out DIR] [--name NAME]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from numbers import Number
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from callbacks.run_folders import checkpoint_dir, log_dir
from lightning_modules.lora_formats import DIFFUSERS_WEIGHT_NAME, export_lora, has_lora, kohya_state_dict

DEFAULT_NAME = "likeness_lora"
# Lightning's short precision spellings (config.yaml) in the unified form that ``str(trainer.precision)`` gives.
_PRECISION_NAMES = {"None": "32-true", "32": "32-true", "64": "64-true", "16": "16-mixed", "bf16": "bf16-mixed"}


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

    def __init__(self, name: str = DEFAULT_NAME, on_checkpoint: bool = True) -> None:
        super().__init__()
        if Path(name).stem == Path(DIFFUSERS_WEIGHT_NAME).stem or not name or "/" in name:
            raise ValueError(
                f"export.name {name!r}: choose a plain file name other than {Path(DIFFUSERS_WEIGHT_NAME).stem!r}, "
                "which the diffusers file uses."
            )
        self.name = name
        self.on_checkpoint = on_checkpoint
        self._last_folder: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Fail at the start, not at the first checkpoint hours later, if the LoRA cannot be exported.
        if stage != "fit":
            return
        if not has_lora(getattr(pl_module, "unet", None)):
            raise ValueError("LoraExport needs pl_module.unet with a peft LoRA adapter named 'default'")
        kohya_state_dict(pl_module.unet, getattr(pl_module, "text_encoder", None))

    def state_dict(self) -> dict[str, Any]:
        # Recorded in every checkpoint so that exporting one later names the files as training did.
        # (No load_state_dict: on resume the run's own config wins.)
        return {"name": self.name}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        folder = checkpoint_dir(trainer) / "lora" / f"step-{trainer.global_step}"
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
            settings=training_settings(
                getattr(pl_module, "hparams", None),
                getattr(datamodule, "hparams", None),
                precision=trainer.precision,
                max_steps=trainer.max_steps,
                learning_rate=configured_learning_rate(groups[0]),
            ),
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


def native_resolution(pl_module: L.LightningModule) -> int:
    """The image side the UNet was built for: its latent size times the VAE's downscale factor."""
    vae = getattr(pl_module, "vae", None)
    factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
    return int(pl_module.unet.config.sample_size) * factor


def configured_learning_rate(param_group: Mapping[str, Any]) -> float | None:
    """The configured learning rate of an optimizer group (before any schedule), else its current one."""
    return param_group.get("initial_lr") or param_group.get("lr")


def training_settings(
    module_hparams: Mapping[str, Any] | None,
    datamodule_hparams: Mapping[str, Any] | None,
    *,
    precision: Any = None,
    max_steps: int | None = None,
    learning_rate: float | None = None,
) -> dict[str, Any]:
    """Scalar hyperparameters of module and datamodule, plus trainer facts, as the model card lists them.

    Args:
        module_hparams: The LightningModule's hyperparameters.
        datamodule_hparams: The datamodule's; a name the module already has is not repeated.
        precision: Trainer precision (any spelling Lightning accepts; ``None`` is its default, 32-true).
        max_steps: Planned optimizer steps; ``None`` or ``-1`` leaves it out.
        learning_rate: The optimizer's learning rate.
    """

    def scalars(hparams: Any) -> dict[str, Any]:
        items = dict(hparams or {}).items()
        # Private entries (LightningCLI's `_instantiator`) are bookkeeping, not settings.
        return {
            k: v
            for k, v in items
            if not k.startswith("_") and (isinstance(v, str | bool | Number) or (isinstance(v, list) and v))
        }

    settings = scalars(module_hparams)
    settings |= {k: v for k, v in scalars(datamodule_hparams).items() if k not in settings}
    settings.pop("pretrained_model_name_or_path", None)  # the card lists it as the base model
    settings["precision"] = _PRECISION_NAMES.get(str(precision), str(precision))
    if max_steps and max_steps > 0:
        settings["max_steps"] = max_steps
    if learning_rate is not None:
        settings["learning_rate"] = learning_rate
    return settings


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m callbacks.lora_export CKPT``: the command lives in :mod:`callbacks.checkpoint_export`."""
    # Imported here: the command loads LoRADiffusion, which the callback itself does not need.
    from callbacks.checkpoint_export import main as export_main

    export_main(argv)


if __name__ == "__main__":
    main()
