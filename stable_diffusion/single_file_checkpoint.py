"""Load an SD1.x base model from one original-layout (CompVis/LDM) checkpoint file: ``.safetensors`` or ``.ckpt``.

The file is read without executing code, refused unless it is a full SD1.x model, and converted with diffusers'
single-file converters against diffusers configs: a local ``config`` folder, or the bundled SD1.5 configs with
SD1.5's tokenizer from the Hub cache. :func:`stable_diffusion.base_model.load_base_model` calls it for files.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import safetensors.torch
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    create_diffusers_clip_model_from_ldm,
    infer_diffusers_model_type,
)
from huggingface_hub import snapshot_download
from transformers import CLIPTextModel, CLIPTokenizer

from stable_diffusion.base_model import (
    CHECKPOINT_SUFFIXES,
    SD15_HUB_ID,
    BaseModel,
    BaseModelError,
    assemble,
    check_sd1,
    checked_tokenizer,
    read_model_index,
)
from stable_diffusion.hub_access import HubAccessError, hub_local_only

# SD1.5's diffusers configs (no weights) for single-file checkpoints loaded without a `config` folder.
SD15_CONFIG_DIR = Path(__file__).parent / "model_configs" / "sd15"
# The original (CompVis/LDM) key prefixes of an SD1.x single-file checkpoint.
LDM_PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text encoder": "cond_stage_model.transformer.",
}
_NOT_SD1_TYPES = {
    "v2": "Stable Diffusion 2.x",
    "inpainting_v2": "a Stable Diffusion 2.x inpainting model",
    "inpainting": "an inpainting model (9-channel UNet)",
    "xl_base": "SDXL",
    "xl_refiner": "the SDXL refiner",
    "xl_inpaint": "an SDXL inpainting model",
    "playground-v2-5": "Playground v2.5 (SDXL family)",
    "upscale": "the SD x4 upscaler",
}


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Read a single-file checkpoint without executing code: safetensors, or a tensors-only torch pickle."""
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise BaseModelError(f"{path}: not a {' or '.join(CHECKPOINT_SUFFIXES)} checkpoint file.")
    try:
        if path.suffix.lower() == ".safetensors":
            state = safetensors.torch.load_file(path)
        else:
            # weights_only refuses arbitrary objects; mmap avoids a second copy of multi-GB files.
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        raise BaseModelError(
            f"{path}: this .ckpt holds Python objects besides tensors, which are not loaded for safety. "
            "Use a .safetensors version of the model, or its diffusers folder."
        ) from e
    except Exception as e:  # noqa: BLE001 - safetensors/torch raise assorted types for broken files
        raise BaseModelError(f"{path}: cannot read the checkpoint (incomplete download?): {e}") from e
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return state


def _check_sd1_checkpoint(path: Path, state: dict[str, torch.Tensor]) -> None:
    model_type = infer_diffusers_model_type(state)
    if model_type in _NOT_SD1_TYPES:
        raise BaseModelError(
            f"{path}: this is {_NOT_SD1_TYPES[model_type]}, not a Stable Diffusion 1.x model; "
            "likeness trains SD1.x models only."
        )
    missing = [part for part, prefix in LDM_PREFIXES.items() if not any(k.startswith(prefix) for k in state)]
    if missing:
        raise BaseModelError(
            f"{path}: not a full SD1.x checkpoint (no {', '.join(missing)} weights under the original "
            f"{'/'.join(LDM_PREFIXES.values())} keys). LoRA, VAE-only or diffusers-layout files cannot be a "
            "base model: use the complete model file, its diffusers folder or its Hub id."
        )


def _load_tokenizer(config_dir: Path) -> CLIPTokenizer:
    """The config folder's tokenizer if it has one, else SD1.5's from the Hub (cache)."""
    if (config_dir / "tokenizer").is_dir():
        tokenizer = CLIPTokenizer.from_pretrained(config_dir, subfolder="tokenizer", local_files_only=True)
        return checked_tokenizer(tokenizer, str(config_dir / "tokenizer"))
    try:
        local_only = hub_local_only(SD15_HUB_ID, None, "model.model_config", probe_file="tokenizer/vocab.json")
        snapshot = snapshot_download(SD15_HUB_ID, allow_patterns=["tokenizer/*"], local_files_only=local_only)
        tokenizer = CLIPTokenizer.from_pretrained(Path(snapshot) / "tokenizer", local_files_only=True)
        return checked_tokenizer(tokenizer, f"{SD15_HUB_ID} (tokenizer)")
    except (OSError, HubAccessError) as e:
        raise BaseModelError(
            f"{config_dir}: has no tokenizer, and SD1.5's ({SD15_HUB_ID}, subfolder tokenizer) is neither in "
            "the Hugging Face cache nor downloadable (offline?); single-file checkpoints do not contain "
            "one. On a machine with network run `hf download "
            f"{SD15_HUB_ID} --include '*.json' '*.txt' --local-dir DIR` (about 2 MB, no weights), copy DIR "
            "here and set model.model_config: DIR."
        ) from e


def load_single_file(path: Path, config: str | None, torch_dtype: torch.dtype | None) -> BaseModel:
    """Load an original-layout (CompVis/LDM) SD1.x checkpoint with diffusers' single-file converters."""
    config_dir = SD15_CONFIG_DIR if config is None else Path(os.path.expanduser(config))
    if not config_dir.is_dir():
        raise BaseModelError(
            f"{config}: `config` must be a local diffusers folder (model_index.json, unet/, vae/, "
            "text_encoder/, tokenizer/, scheduler/ configs); no such folder."
        )
    index = read_model_index(config_dir)
    # The tokenizer first: a missing one is a setup problem best reported before reading gigabytes.
    tokenizer = _load_tokenizer(config_dir)
    state = _read_checkpoint(path)
    _check_sd1_checkpoint(path, state)
    try:
        unet_config = UNet2DConditionModel.load_config(config_dir, subfolder="unet")
        check_sd1(str(config_dir), index, unet_config)
        # A local `config` folder keeps every step offline: no original YAML, no Hub config lookup.
        kwargs = {"config": str(config_dir), "torch_dtype": torch_dtype, "local_files_only": True}
        unet = UNet2DConditionModel.from_single_file(state, subfolder="unet", **kwargs)
        vae = AutoencoderKL.from_single_file(state, subfolder="vae", **kwargs)
        text_encoder = create_diffusers_clip_model_from_ldm(CLIPTextModel, state, subfolder="text_encoder", **kwargs)
        scheduler_config = DDPMScheduler.load_config(config_dir, subfolder="scheduler")
    except BaseModelError:
        raise
    except (OSError, ValueError, RuntimeError) as e:
        raise BaseModelError(
            f"{path}: its weights do not fit the configs in {config_dir}: {e}. Set `config` to a diffusers "
            "folder of the same architecture."
        ) from e
    return assemble(tokenizer, text_encoder, vae, unet, scheduler_config, str(path))
