"""Write a trained LoRA as the kohya-format file that A1111/Forge and ComfyUI load (``<name>.safetensors``).

Keys are kohya's ``lora_unet_*`` / ``lora_te_text_model_*`` with a real ``.alpha`` per module, and the header is
kohya sd-scripts' ``ss_*`` (plus ``modelspec.*``). :func:`lora_files.lora_formats.export_lora` writes this
file beside the diffusers one.

Known limit of diffusers 0.42 (not of the files): its kohya loader guesses the text-encoder key style from
``out_proj`` keys, so a kohya text-encoder LoRA without ``out_proj`` among its targets fails to load
there (``Could not automatically infer state dict type``), or with MLP targets loses its attention part.
A1111 and ComfyUI read such files fine, and the diffusers file always loads.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path

import torch
from safetensors.torch import save_file

from lora_files.lora_adapter import ADAPTER_NAME, has_lora, lora_tensors, text_model_path

__all__ = ["kohya_metadata", "kohya_state_dict", "save_kohya_lora"]

# Lightning's precision names in the words kohya's ss_mixed_precision uses (accelerate's).
KOHYA_PRECISION = {"32-true": "no", "16-mixed": "fp16", "bf16-mixed": "bf16", "16-true": "fp16", "bf16-true": "bf16"}


def _module_scales(model: torch.nn.Module, adapter_name: str) -> dict[str, float]:
    """Each LoRA layer's effective ``scaling``: alpha / r (alpha / sqrt(r) with rsLoRA), patterns applied."""
    return {
        name: float(module.scaling[adapter_name])
        for name, module in model.named_modules()
        if adapter_name in (getattr(module, "scaling", None) or {})
    }


def _kohya_pairs(model: torch.nn.Module, adapter_name: str, prefix: str, text_model: bool = False) -> dict:
    """kohya triplets ``<prefix><path with _>.lora_down/lora_up/alpha`` for one peft-wrapped model."""
    tensors = lora_tensors(model, adapter_name)
    scales = _module_scales(model, adapter_name)
    unsupported = [k for k in tensors if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if unsupported:
        raise ValueError(f"kohya files hold plain LoRA only (no DoRA/bias/embedding LoRA): {unsupported[:3]}")
    out: dict[str, torch.Tensor] = {}
    for key, down in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module_path = key.removesuffix(".lora_A.weight")
        kohya = prefix + (text_model_path(module_path) if text_model else module_path).replace(".", "_")
        out[f"{kohya}.lora_down.weight"] = down
        out[f"{kohya}.lora_up.weight"] = tensors[f"{module_path}.lora_B.weight"]
        # Loaders scale by alpha / rank with rank = lora_down.shape[0]; store the alpha that reproduces
        # peft's effective scale, which is the real lora_alpha for plain LoRA.
        out[f"{kohya}.alpha"] = torch.tensor(scales[module_path] * down.shape[0], dtype=torch.float32)
    return out


def kohya_state_dict(
    unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None, *, adapter_name: str = ADAPTER_NAME
) -> dict[str, torch.Tensor]:
    """The LoRA in kohya/A1111 naming: ``lora_unet_*`` and ``lora_te_text_model_encoder_*`` keys."""
    out = _kohya_pairs(unet, adapter_name, "lora_unet_")
    if has_lora(text_encoder, adapter_name):
        out |= _kohya_pairs(text_encoder, adapter_name, "lora_te_", text_model=True)
    return out


def _tag_frequency(captions: Iterable[str]) -> dict[str, int]:
    """kohya's tag count: captions split at commas, stripped, counted (most common first)."""
    tags = Counter(t.strip() for c in captions for t in c.split(",") if t.strip())
    return dict(tags.most_common())


def kohya_metadata(
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None = None,
    *,
    name: str,
    base_model: str,
    steps: int,
    resolution: int | tuple[int, int],
    captions: Iterable[str] = (),
    settings: Mapping | None = None,
    started_at: float | None = None,
    adapter_name: str = ADAPTER_NAME,
) -> dict[str, str]:
    """kohya sd-scripts' ``ss_*`` header (plus ``modelspec.*``) that A1111/Forge show; all values strings.

    ``started_at`` is the training start (a ``time.time()`` value); ``settings`` may hold ``precision`` (Lightning's
    spelling) and ``prediction_type`` (the noise scheduler's).
    """
    captions = list(captions)
    finished = time.time()
    width, height = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    unet_cfg = unet.peft_config[adapter_name]
    settings = dict(settings or {})
    network_args = {"target_modules": sorted(unet_cfg.target_modules)}
    if has_lora(text_encoder, adapter_name):
        te_cfg = text_encoder.peft_config[adapter_name]
        network_args |= {
            "text_encoder_dim": te_cfg.r,
            "text_encoder_alpha": te_cfg.lora_alpha,
            "text_encoder_target_modules": sorted(te_cfg.target_modules),
        }
    base_path = Path(base_model)
    meta = {
        "ss_output_name": name,
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        # kohya records the file name of a local checkpoint; a Hub id is kept whole.
        "ss_sd_model_name": base_path.name if base_path.exists() else base_model,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(unet_cfg.r),
        "ss_network_alpha": str(float(unet_cfg.lora_alpha)),
        "ss_network_args": json.dumps(network_args),
        "ss_network_train_unet_only": str(not has_lora(text_encoder, adapter_name)),
        "ss_steps": str(int(steps)),
        "ss_max_train_steps": str(settings.get("max_steps", steps)),
        "ss_resolution": str((width, height)),
        "ss_num_train_images": str(len(captions)),
        "ss_tag_frequency": json.dumps({name: _tag_frequency(captions)}),
        "ss_training_finished_at": str(finished),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": name,
        "modelspec.resolution": f"{width}x{height}",
        # As kohya writes them (library/sai_model_spec.py): an ISO-8601 date and "epsilon" or "v".
        "modelspec.date": datetime.fromtimestamp(int(finished)).isoformat(),
        "modelspec.prediction_type": "v" if settings.get("prediction_type") == "v_prediction" else "epsilon",
    }
    if started_at is not None:
        meta["ss_training_started_at"] = str(started_at)
    if "precision" in settings:  # kohya records accelerate's words: no, fp16, bf16
        meta["ss_mixed_precision"] = KOHYA_PRECISION.get(str(settings["precision"]), str(settings["precision"]))
    for key, ss_key in (
        ("learning_rate", "ss_learning_rate"),
        ("seed", "ss_seed"),
        ("batch_size", "ss_batch_size_per_device"),
        ("lr_scheduler", "ss_lr_scheduler"),
        ("learning_rate", "ss_unet_lr"),  # kohya's per-network rates: the UNet's is the optimizer's
        ("text_encoder_lr", "ss_text_encoder_lr"),
    ):
        if key in settings:
            meta[ss_key] = str(settings[key])
    return meta


def save_kohya_lora(
    path: str | Path,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None = None,
    *,
    base_model: str,
    steps: int,
    resolution: int | tuple[int, int],
    captions: Iterable[str] = (),
    settings: Mapping | None = None,
    started_at: float | None = None,
    adapter_name: str = ADAPTER_NAME,
) -> Path:
    """Write the kohya-format file (``models/Lora`` in A1111/Forge, ``models/loras`` in ComfyUI)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = kohya_metadata(
        unet,
        text_encoder,
        name=path.stem,
        base_model=base_model,
        steps=steps,
        resolution=resolution,
        captions=captions,
        settings=settings,
        started_at=started_at,
        adapter_name=adapter_name,
    )
    save_file(kohya_state_dict(unet, text_encoder, adapter_name=adapter_name), path, metadata=meta)
    return path
