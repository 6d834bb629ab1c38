"""Write a trained LoRA in the file formats that diffusers, ComfyUI and A1111/Forge load.

Everything is built straight from peft's own state dicts and configs, not by chaining converters:
diffusers' kohya converter writes ``alpha = rank`` whatever the real alpha was, and under transformers 5
the CLIP text encoder has no ``text_model`` level, so naive kohya keys come out as
``lora_te_encoder_layers_*``, which A1111 and ComfyUI silently ignore. Files written here:

* ``pytorch_lora_weights.safetensors`` — diffusers/peft keys (``unet.`` / ``text_encoder.`` prefixes) plus
  the adapter config in the ``lora_adapter_metadata`` header, so ``load_lora_weights`` rebuilds the exact
  rank and alpha.
* ``<name>.safetensors`` — kohya ``lora_unet_*`` / ``lora_te_text_model_*`` keys with a real ``.alpha``
  per module and kohya's ``ss_*`` header, for A1111, Forge and ComfyUI.
* ``README.md`` — a model card (see :func:`lightning_modules.lora_model_card.write_model_card`).

Known limit of diffusers 0.42 (not of the files): its kohya loader guesses the text-encoder key style from
``out_proj`` keys, so a kohya text-encoder LoRA without ``out_proj`` among its targets fails to load
there (``Could not automatically infer state dict type``), or with MLP targets loses its attention part.
A1111 and ComfyUI read such files fine, and the diffusers file always loads.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file

from lightning_modules.finite import check_finite
from lightning_modules.lora_model_card import write_model_card

__all__ = [
    "ADAPTER_NAME",
    "DIFFUSERS_WEIGHT_NAME",
    "adapter_metadata",
    "export_lora",
    "has_lora",
    "kohya_metadata",
    "kohya_state_dict",
    "save_diffusers_lora",
    "save_kohya_lora",
    "write_model_card",
]

ADAPTER_NAME = "default"
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# Lightning's precision names in the words kohya's ss_mixed_precision uses (accelerate's).
KOHYA_PRECISION = {"32-true": "no", "16-mixed": "fp16", "bf16-mixed": "bf16", "16-true": "fp16", "bf16-true": "bf16"}
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
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def has_lora(model: torch.nn.Module | None, adapter_name: str = ADAPTER_NAME) -> bool:
    """Whether ``model`` carries a peft LoRA adapter called ``adapter_name``."""
    return model is not None and adapter_name in (getattr(model, "peft_config", None) or {})


def adapter_metadata(model: torch.nn.Module, adapter_name: str = ADAPTER_NAME) -> dict:
    """The adapter's ``LoraConfig`` as a JSON-able dict: rank, alpha, targets and every non-default field."""
    config = model.peft_config[adapter_name].to_dict()
    defaults = LoraConfig().to_dict()
    out = {}
    for key, value in config.items():
        always = key in ("r", "lora_alpha", "target_modules")
        if key in _BOOKKEEPING_FIELDS or (not always and value == defaults.get(key)):
            continue
        out[key] = sorted(value) if isinstance(value, set) else value
    return out


def _lora_tensors(model: torch.nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """peft's state dict (keys ``<module>.lora_A.weight``), detached and contiguous on the CPU."""
    init = model.peft_config[adapter_name].init_lora_weights
    if isinstance(init, str) and init.startswith(_BASE_CHANGING_INITS):
        # These inits subtract the initial LoRA from the base weights, so A/B alone are not a delta
        # against the published base model that every loader applies them to.
        raise ValueError(f"a LoRA initialised with {init!r} changed the base weights; it cannot be exported")
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def _text_model_path(module_path: str) -> str:
    """CLIP module path with the ``text_model.`` level that transformers 5 dropped and every tool expects."""
    return module_path if module_path.startswith("text_model.") else f"text_model.{module_path}"


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
        te_layers = {_text_model_path(k): v for k, v in _lora_tensors(te, adapter_name).items()}
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=_lora_tensors(unet, adapter_name),
        text_encoder_lora_layers=te_layers,
        weight_name=weight_name,
        unet_lora_adapter_metadata=adapter_metadata(unet, adapter_name),
        text_encoder_lora_adapter_metadata=adapter_metadata(te, adapter_name) if te is not None else None,
    )
    return Path(folder) / weight_name


def _module_scales(model: torch.nn.Module, adapter_name: str) -> dict[str, float]:
    """Each LoRA layer's effective ``scaling``: alpha / r (alpha / sqrt(r) with rsLoRA), patterns applied."""
    return {
        name: float(module.scaling[adapter_name])
        for name, module in model.named_modules()
        if adapter_name in (getattr(module, "scaling", None) or {})
    }


def _kohya_pairs(model: torch.nn.Module, adapter_name: str, prefix: str, text_model: bool = False) -> dict:
    """kohya triplets ``<prefix><path with _>.lora_down/lora_up/alpha`` for one peft-wrapped model."""
    tensors = _lora_tensors(model, adapter_name)
    scales = _module_scales(model, adapter_name)
    unsupported = [k for k in tensors if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if unsupported:
        raise ValueError(f"kohya files hold plain LoRA only (no DoRA/bias/embedding LoRA): {unsupported[:3]}")
    out: dict[str, torch.Tensor] = {}
    for key, down in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module_path = key.removesuffix(".lora_A.weight")
        kohya = prefix + (_text_model_path(module_path) if text_model else module_path).replace(".", "_")
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
    # Written into a staging folder beside ``folder``, then each file renamed into place (issue #8): a kill or a full
    # disk never leaves a torn LoRA file under its final name, and files exported earlier stay as they were.
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.parent.glob(f".{folder.name}.partial-*"):  # left by an export that was killed (SIGKILL)
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
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
        for kind, path in staged.items():
            os.replace(path, files[kind])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return files
