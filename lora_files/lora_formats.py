"""Write a trained LoRA in the file formats that diffusers, ComfyUI and A1111/Forge load.

Everything is built straight from peft's own state dicts and configs, not by chaining converters:
diffusers' kohya converter writes ``alpha = rank`` whatever the real alpha was, and under transformers 5
the CLIP text encoder has no ``text_model`` level, so naive kohya keys come out as
``lora_te_encoder_layers_*``, which A1111 and ComfyUI silently ignore. Files written here:

* ``pytorch_lora_weights.safetensors`` — diffusers/peft keys (``unet.`` / ``text_encoder.`` prefixes) plus
  the adapter config in the ``lora_adapter_metadata`` header, so ``load_lora_weights`` rebuilds the exact
  rank and alpha.
* ``<name>.safetensors`` — kohya ``lora_unet_*`` / ``lora_te_text_model_*`` keys with a real ``.alpha``
  per module and kohya's ``ss_*`` header, for A1111, Forge and ComfyUI (written by
  :mod:`lora_files.kohya_lora`).
* ``README.md`` — a model card (see :func:`lora_files.lora_model_card.write_model_card`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig

from datamodules.files import file_mode, remove_empty
from lightning_modules.finite import check_finite
from lora_files.kohya_lora import save_kohya_lora
from lora_files.lora_adapter import ADAPTER_NAME, has_lora, lora_tensors, text_model_path
from lora_files.lora_model_card import write_model_card

__all__ = [
    "DIFFUSERS_WEIGHT_NAME",
    "adapter_metadata",
    "export_lora",
    "save_diffusers_lora",
]

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# An export stages its files in a hidden folder inside the output folder; one older than this was killed.
STAGING_PREFIX = ".export.partial-"
STAGING_MAX_AGE_S = 600
# Config fields that describe the run, not the adapter; leaving them out keeps the header loadable by
# other peft versions (diffusers calls ``LoraConfig(**metadata)``, which rejects unknown fields).
_BOOKKEEPING_FIELDS = {
    "task_type",
    "peft_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "init_lora_weights",
    "megatron_core",
    "runtime_config",
}


def adapter_metadata(model: torch.nn.Module, adapter_name: str = ADAPTER_NAME) -> dict:
    """The adapter's ``LoraConfig`` as a JSON-able dict: rank, alpha, targets and every non-default field."""
    config = model.peft_config[adapter_name].to_dict()
    defaults = LoraConfig().to_dict()
    out = {}
    for key, value in config.items():
        always = key in ("r", "lora_alpha", "target_modules")
        # lora_dropout only trains: diffusers rebuilds the adapter from this header in training mode, so a
        # dropout there would drop LoRA inputs at random in every generation.
        if key in _BOOKKEEPING_FIELDS or key == "lora_dropout" or (not always and value == defaults.get(key)):
            continue
        out[key] = sorted(value) if isinstance(value, set) else value
    return out


def save_diffusers_lora(
    folder: str | Path,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None = None,
    *,
    adapter_name: str = ADAPTER_NAME,
    weight_name: str = DIFFUSERS_WEIGHT_NAME,
) -> Path:
    """Write the diffusers LoRA file that ``StableDiffusionPipeline.load_lora_weights(folder)`` loads.

    Args:
        folder: Output folder (created).
        unet: UNet with a peft LoRA adapter.
        text_encoder: CLIP text encoder; its LoRA is written only if it has one.
        adapter_name: peft adapter to export.
        weight_name: File name inside ``folder``.

    Returns:
        Path of the written file.
    """
    te = text_encoder if has_lora(text_encoder, adapter_name) else None
    te_layers = None
    if te is not None:
        # Spell keys the transformers-4 way (``text_model.encoder...``): older diffusers need it, and
        # diffusers 0.42 strips the level again when the text encoder lacks it.
        te_layers = {text_model_path(k): v for k, v in lora_tensors(te, adapter_name).items()}
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=lora_tensors(unet, adapter_name),
        text_encoder_lora_layers=te_layers,
        weight_name=weight_name,
        unet_lora_adapter_metadata=adapter_metadata(unet, adapter_name),
        text_encoder_lora_adapter_metadata=adapter_metadata(te, adapter_name) if te is not None else None,
    )
    return Path(folder) / weight_name


def export_lora(
    folder: str | Path,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None = None,
    *,
    name: str,
    base_model: str,
    steps: int,
    resolution: int | tuple[int, int],
    captions: Iterable[str] = (),
    metrics: Mapping[str, float] | None = None,
    settings: Mapping | None = None,
    started_at: float | None = None,
    adapter_name: str = ADAPTER_NAME,
) -> dict[str, Path]:
    """Write the diffusers file, the kohya file ``<name>.safetensors`` and ``README.md`` into ``folder``.

    Returns:
        ``{"diffusers": ..., "kohya": ..., "model_card": ...}`` paths.
    """
    folder = Path(folder)
    captions = list(captions)
    settings = dict(settings or {})
    te = text_encoder if has_lora(text_encoder, adapter_name) else None
    lora_tensors = {
        f"{part}.{name}": param
        for part, model in (("unet", unet), ("text_encoder", te))
        if model is not None
        for name, param in model.named_parameters()
        if ".lora_" in name
    }
    check_finite(lora_tensors, f"The LoRA to export to {folder}", "Nothing was written; export an earlier checkpoint.")
    # Written into a staging folder inside ``folder``, then each file renamed into place (issue #8): a kill or a full
    # disk never leaves a torn LoRA file under its final name, and files exported earlier stay as they were. Inside,
    # not beside: ``folder`` may be a mount point, or sit in a folder the user cannot write to, and a rename stays
    # atomic only within one filesystem.
    with _folder_for(folder):
        for stale in folder.glob(f"{STAGING_PREFIX}*"):
            if _abandoned(stale):
                shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder))
        try:
            diffusers_file = save_diffusers_lora(staging, unet, te, adapter_name=adapter_name)
            kohya_file = save_kohya_lora(
                staging / f"{name}.safetensors",
                unet,
                te,
                base_model=base_model,
                steps=steps,
                resolution=resolution,
                captions=captions,
                settings=settings,
                started_at=started_at,
                adapter_name=adapter_name,
            )
            lora = {"unet": adapter_metadata(unet, adapter_name)}
            if te is not None:
                lora["text_encoder"] = adapter_metadata(te, adapter_name)
            card = write_model_card(
                staging,
                name=name,
                base_model=base_model,
                settings=settings,
                metrics=metrics,
                steps=steps,
                resolution=resolution,
                captions=captions,
                lora=lora,
                diffusers_file=diffusers_file.name,
                kohya_file=kohya_file.name,
            )
            staged = {"diffusers": diffusers_file, "kohya": kohya_file, "model_card": card}
            files = {kind: folder / path.name for kind, path in staged.items()}
            mode = file_mode(staging)  # safetensors writes 0o600
            for kind, path in staged.items():
                os.chmod(path, mode)
                os.replace(path, files[kind])
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    _warn_of_earlier_exports(folder, files["kohya"])
    return files


def _warn_of_earlier_exports(folder: Path, kohya_file: Path) -> None:
    """Kohya files of earlier exports into ``folder`` stay (it may be ComfyUI's ``models/loras``, full of a user's
    LoRAs), but A1111 and ComfyUI list them beside this one, and the diffusers file and README.md now describe this
    one alone: said, so that an older file is not taken for the new one."""
    from safetensors import safe_open

    earlier = []
    for path in sorted(folder.glob("*.safetensors")):
        if path.name in (kohya_file.name, DIFFUSERS_WEIGHT_NAME):
            continue
        try:
            with safe_open(str(path), framework="pt") as file:
                metadata = file.metadata() or {}
        except Exception:  # noqa: BLE001 - not a safetensors file likeness could have written: none of ours
            continue
        if "ss_output_name" in metadata and metadata.get("ss_output_name") == path.stem:
            earlier.append(path.name)
    if earlier:
        warnings.warn(
            f"{folder} also holds {len(earlier)} LoRA file(s) of earlier exports ({', '.join(earlier[:3])}"
            f"{', ...' if len(earlier) > 3 else ''}); {DIFFUSERS_WEIGHT_NAME} and README.md there describe "
            f"{kohya_file.name} alone. Export into a folder of its own to keep them apart.",
            stacklevel=3,
        )


@contextmanager
def _folder_for(folder: Path) -> Iterator[None]:
    """``folder``, made if need be, and the folders made for it removed again if the export fails before a file
    landed in them: a failed export leaves nothing behind."""
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        remove_empty(made)
        raise


def _abandoned(staging: Path) -> bool:
    """A staging folder left by an export that was killed (SIGKILL): untouched for longer than any export takes.
    A younger one may be another process's export into the same folder, under way."""
    try:
        return time.time() - staging.stat().st_mtime > STAGING_MAX_AGE_S
    except FileNotFoundError:
        return False
