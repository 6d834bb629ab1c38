"""What an exported LoRA records about its run — file names, settings, resolution — shared by the ``LoraExport``
callback and the ``likeness export`` command (:mod:`callbacks.checkpoint_export`)."""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Number
from typing import Any

import lightning as L

FALLBACK_NAME = "likeness"  # a run without a logger
# Lightning's short precision spellings (config.yaml) in the unified form that ``str(trainer.precision)`` gives.
_PRECISION_NAMES = {"None": "32-true", "32": "32-true", "64": "64-true", "16": "16-mixed", "bf16": "bf16-mixed"}


def run_name(trainer: L.Trainer) -> str:
    """``<logger name>-v<version>`` (``brad-v3``): unique per run folder, so LoRA names of two runs never clash."""
    logger = trainer.logger
    if logger is None:
        return FALLBACK_NAME
    version = logger.version
    name = f"{logger.name}-{f'v{version}' if isinstance(version, int) else version}"
    # A logger name may hold folders (`brad/rank8`): one file name, as the card's <lora:...> tag must match it.
    return name.replace("/", "-").replace("\\", "-").lstrip(".") or FALLBACK_NAME


def check_lora_name(name: str | None, setting: str) -> None:
    """A LoRA name is one plain file name: with a folder in it, the kohya file, its ``ss_output_name`` and the
    card's ``<lora:...>`` tag disagreed, and A1111 found nothing."""
    if name is not None and (not name or "/" in name or "\\" in name or name.startswith(".")):
        raise ValueError(f"{setting} {name!r}: choose a plain file name (no folder, no leading dot), or leave it out.")


def lora_file_stem(name: str, step: int) -> str:
    """The kohya file's stem and A1111 alias: ``<name>-step<NNNNNN>``.

    A1111 and Forge list a LoRA under its stem (or the ``ss_output_name`` in it, the same): two files with one
    alias in ``models/Lora`` make ``<lora:alias:1>`` find neither (issue #10), so each step of each run gets its own.
    """
    return f"{name}-step{step:06d}"


def step_folder(step: int) -> str:
    """A step's folder name, as the step checkpoints are named (``step000030``, see train.py's defaults)."""
    return f"step{step:06d}"


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
    prediction_type: str | None = None,
    seed: Any = None,
) -> dict[str, Any]:
    """Scalar hyperparameters of module and datamodule, plus trainer facts, as the model card lists them.

    Args:
        module_hparams: The LightningModule's hyperparameters.
        datamodule_hparams: The datamodule's; a name the module already has is not repeated.
        precision: Trainer precision (any spelling Lightning accepts; ``None`` is its default, 32-true).
        max_steps: Planned optimizer steps; ``None`` or ``-1`` leaves it out.
        learning_rate: The optimizer's learning rate.
        prediction_type: What the UNet predicts (the noise scheduler's ``prediction_type``).
        seed: The run's ``seed_everything`` (kohya's ``ss_seed``); not an integer leaves it out.
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
    settings.pop("resolution", None)  # and the resolution, as width×height
    # data.center_crop is the deprecated spelling of data.crop (false: random): the card gives the crop trained with,
    # not `center_crop: true` beside `crop: face`.
    if settings.pop("center_crop", True) is False and settings.get("crop") == "center":
        settings["crop"] = "random"
    settings["precision"] = _PRECISION_NAMES.get(str(precision), str(precision))
    if max_steps and max_steps > 0:
        settings["max_steps"] = max_steps
    if learning_rate is not None:
        settings["learning_rate"] = learning_rate
    if prediction_type is not None:
        settings["prediction_type"] = prediction_type
    if str(seed).lstrip("-").isdigit() and not isinstance(seed, bool):
        settings["seed"] = int(seed)
    return settings


# kohya sd-scripts (networks/lora.py) builds LoRA modules only inside these UNet blocks (attention blocks, and with
# conv LoRA the resnets and resamplers): a LoRA on `conv_in`, `conv_out` or `time_embedding` loads in ComfyUI, A1111
# and Forge but is dropped without a word by kohya's scripts (issue #10).
KOHYA_UNET_BLOCKS = {"Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"}


def kohya_ignored_modules(unet: Any) -> list[str]:
    """The UNet's LoRA-wrapped modules that kohya sd-scripts would ignore (outside :data:`KOHYA_UNET_BLOCKS`)."""
    classes = {name: type(module).__name__ for name, module in unet.named_modules()}
    ignored = []
    for name, module in unet.named_modules():
        if not hasattr(module, "lora_A") or not module.lora_A:
            continue
        parts = name.split(".")
        ancestors = (".".join(parts[:i]) for i in range(1, len(parts)))
        if not any(classes.get(a) in KOHYA_UNET_BLOCKS for a in ancestors):
            ignored.append(name)
    return ignored
