"""Load the Stable Diffusion 1.x base model from a Hub id, a diffusers folder or a single checkpoint file.

``load_base_model`` returns the five parts training needs (tokenizer, text encoder, VAE, UNet, DDPM noise
schedule) plus the model's own sampler config for inference. The product trains SD1.x only: SD2, SDXL,
inpainting and other families are refused with a message saying so, before any weights are read. Single
checkpoint files are loaded by :mod:`stable_diffusion.single_file_checkpoint`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from transformers import CLIPTextModel, CLIPTokenizer

from stable_diffusion.host_timestep_pndm import HostTimestepPNDMScheduler
from stable_diffusion.hub_access import HubAccessError, hub_local_only, not_cached_message

SETTING = "model.pretrained_model_name_or_path"

# Where the SD1.5 tokenizer comes from when the config folder has none (it is too big to ship).
SD15_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


class BaseModelError(ValueError):
    """The base model setting points at something that cannot be loaded; the message says what to do."""


@dataclass
class BaseModel:
    """The loaded parts of an SD1.x model.

    Attributes:
        tokenizer: CLIP tokenizer.
        text_encoder: CLIP text encoder.
        vae: KL autoencoder.
        unet: Conditional denoising UNet.
        noise_scheduler: DDPM schedule built from the model's scheduler config, for training.
        sampler_config: The model's own scheduler config (with ``_class_name``), for inference.
        source: What was loaded (Hub id or path), for model cards and metadata.
    """

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    sampler_config: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def sampler(self, name: str | None = None) -> diffusers.SchedulerMixin:
        """A fresh inference scheduler: the model's own, or the diffusers class ``name`` with the model's config."""
        name = name or self.sampler_config.get("_class_name", "PNDMScheduler")
        cls = getattr(diffusers, name, None)
        if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
            raise BaseModelError(
                f"{self.source}: scheduler {name!r} is not a diffusers scheduler class "
                "(model.sampler takes names like DPMSolverMultistepScheduler)."
            )
        if cls is diffusers.PNDMScheduler:  # the same sampler, without a GPU wait per step
            cls = HostTimestepPNDMScheduler
        return cls.from_config(self.sampler_config)

    def pipeline(
        self,
        unet: torch.nn.Module | None = None,
        text_encoder: torch.nn.Module | None = None,
        sampler: str | None = None,
    ) -> StableDiffusionPipeline:
        """Build an inference pipeline sharing these modules (no weights are copied).

        Args:
            unet: UNet to use instead of ``self.unet``, e.g. the LoRA-wrapped one being trained.
            text_encoder: Text encoder to use instead of ``self.text_encoder``.
            sampler: diffusers scheduler class name instead of the model's own.
        """
        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder if text_encoder is None else text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet if unet is None else unet,
            scheduler=self.sampler(sampler),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


def load_base_model(
    pretrained_model_name_or_path: str,
    revision: str | None = None,
    variant: str | None = None,
    torch_dtype: torch.dtype | None = None,
    config: str | None = None,
) -> BaseModel:
    """Load an SD1.x model from a Hub id, a local diffusers folder or a ``.safetensors``/``.ckpt`` file.

    Args:
        pretrained_model_name_or_path: Hub id (``org/name``), diffusers folder, or single checkpoint file.
        revision: Hub branch, tag or commit (Hub ids only).
        variant: Weight file variant such as ``"fp16"`` (Hub ids and folders only).
        torch_dtype: dtype to load the weights in; None keeps the stored one.
        config: Single files only: a local diffusers folder with the component configs and tokenizer.
            Default: the bundled SD1.5 configs, with the tokenizer from the Hub cache.

    Raises:
        BaseModelError: The model is missing, unreachable, not SD1.x, or not a model at all.
    """
    name = str(pretrained_model_name_or_path)
    path = Path(os.path.expanduser(name))
    if path.is_file():
        if revision is not None or variant is not None:
            raise BaseModelError(f"{name}: `revision`/`variant` apply to Hub ids and folders, not single files.")
        # Imported here, not at the top: single_file_checkpoint imports this module (BaseModel, errors, checks).
        from stable_diffusion.single_file_checkpoint import load_single_file

        return load_single_file(path, config, torch_dtype)
    if config is not None:
        raise BaseModelError(f"{name}: `config` applies to single checkpoint files only; remove it.")
    if path.is_dir():
        return _load_diffusers(name, str(path), read_model_index(path), None, variant, torch_dtype, True)
    if looks_like_path(name):
        raise BaseModelError(
            f"{name}: no such file or folder. Point model.pretrained_model_name_or_path at an existing "
            f"diffusers folder or a {'/'.join(CHECKPOINT_SUFFIXES)} file, or give a Hub id "
            f"like '{SD15_HUB_ID}'."
        )
    try:
        local_only = hub_local_only(name, revision, SETTING, probe_file="model_index.json")
    except HubAccessError as e:
        raise BaseModelError(str(e)) from e
    try:
        index_file = hf_hub_download(name, "model_index.json", revision=revision, local_files_only=local_only)
    except LocalEntryNotFoundError as e:
        raise BaseModelError(not_cached_message(name, SETTING)) from e
    except EntryNotFoundError as e:
        raise BaseModelError(
            f"{name}: not a diffusers model repo (no model_index.json). Give the id of an SD1.x diffusers "
            "model, or download its single checkpoint file and point at that file."
        ) from e
    except OSError as e:
        raise BaseModelError(f"{not_cached_message(name, SETTING)} ({e})") from e
    index = json.loads(Path(index_file).read_text())
    return _load_diffusers(name, name, index, revision, variant, torch_dtype, local_only)


def looks_like_path(name: str) -> bool:
    """A string that cannot be a Hub id (``org/name``) is meant as a local path."""
    return (
        name.startswith((".", "~", "/"))
        or "\\" in name
        or name.count("/") > 1
        or name.lower().endswith(CHECKPOINT_SUFFIXES)
    )


def read_model_index(folder: Path) -> dict[str, Any]:
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        files = sorted(p.name for p in folder.iterdir() if p.suffix in CHECKPOINT_SUFFIXES)
        hint = f" It holds {files}: pass that file instead." if files else ""
        raise BaseModelError(
            f"{folder}: not a diffusers model folder (no model_index.json).{hint} Point "
            "model.pretrained_model_name_or_path at a diffusers folder, a checkpoint file, or a Hub id."
        )
    return json.loads(index_file.read_text())


def check_sd1(source: str, index: dict[str, Any], unet_config: dict[str, Any]) -> None:
    """Refuse anything that is not an SD1.x text-to-image model, by structure (sizes vary)."""
    refuse = f"{source}: this is not a Stable Diffusion 1.x model ({{}}); likeness trains SD1.x models only."
    if "text_encoder_2" in index or "XL" in str(index.get("_class_name", "")):
        raise BaseModelError(refuse.format("SDXL: it has a second text encoder"))
    expected = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel"}
    for part, cls in expected.items():
        found = (index.get(part) or [None, None])[1]
        if found != cls:
            raise BaseModelError(refuse.format(f"its {part} is {found}, expected {cls}"))
    dim = unet_config.get("cross_attention_dim")
    if dim in (1024, 2048) or not isinstance(dim, int):
        family = {1024: "SD2.x: cross_attention_dim 1024", 2048: "SDXL: cross_attention_dim 2048"}
        raise BaseModelError(refuse.format(family.get(dim, f"cross_attention_dim {dim}")))
    if unet_config.get("in_channels") != 4 or unet_config.get("addition_embed_type") is not None:
        raise BaseModelError(refuse.format(f"UNet with {unet_config.get('in_channels')} input channels"))


def assemble(tokenizer, text_encoder, vae, unet, scheduler_config: dict[str, Any], source: str) -> BaseModel:
    return BaseModel(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        unet=unet,
        noise_scheduler=DDPMScheduler.from_config(scheduler_config),
        sampler_config=dict(scheduler_config),
        source=source,
    )


def _load_diffusers(
    source: str,
    where: str,
    index: dict[str, Any],
    revision: str | None,
    variant: str | None,
    torch_dtype: torch.dtype | None,
    local_only: bool,
) -> BaseModel:
    """Load a diffusers-layout model (folder or Hub id) component by component."""
    common = {"revision": revision, "local_files_only": local_only}
    try:
        unet_config = UNet2DConditionModel.load_config(where, subfolder="unet", **common)
        check_sd1(source, index, unet_config)
        weights = {**common, "variant": variant, "torch_dtype": torch_dtype}
        unet = UNet2DConditionModel.from_pretrained(where, subfolder="unet", **weights)
        vae = AutoencoderKL.from_pretrained(where, subfolder="vae", **weights)
        text_encoder = CLIPTextModel.from_pretrained(where, subfolder="text_encoder", **weights)
        tokenizer = checked_tokenizer(
            CLIPTokenizer.from_pretrained(where, subfolder="tokenizer", **common), f"{source} (tokenizer)"
        )
        scheduler_config = DDPMScheduler.load_config(where, subfolder="scheduler", **common)
    except BaseModelError:
        raise
    except (OSError, ValueError) as e:
        raise BaseModelError(f"{source}: could not load it as a diffusers SD1.x model: {e}") from e
    return assemble(tokenizer, text_encoder, vae, unet, scheduler_config, source)


def checked_tokenizer(tokenizer: CLIPTokenizer, where: str) -> CLIPTokenizer:
    # transformers 5 returns a vocabulary-less tokenizer instead of failing when vocab.json is missing.
    if len(tokenizer.get_vocab()) < 256:
        raise BaseModelError(f"{where}: the tokenizer has no vocabulary (vocab.json/merges.txt missing).")
    return tokenizer
