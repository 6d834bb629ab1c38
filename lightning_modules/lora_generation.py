"""Images from the LoRA being trained (validation, test, predict): each item's seed, and the inference pipeline over
the in-memory modules with the ``model.*`` generation settings. :mod:`lightning_modules.generation` batches the calls.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from PIL import Image

from lightning_modules.generation import BatchedGeneration
from stable_diffusion.base_model import BaseModel


def generation_seeds(batch: dict[str, Any], generation_seed: int) -> list[int]:
    """Image ``i`` of prompt ``p`` gets seed ``generation_seed + p + 1000 i`` (the batch's ``index`` and ``repeat``)."""
    repeats = batch.get("repeat", torch.zeros_like(batch["index"]))
    return [generation_seed + int(i) + 1000 * int(r) for i, r in zip(batch["index"], repeats, strict=True)]


@torch.no_grad()
def generate_images(
    base: BaseModel,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module,
    batched_generation: BatchedGeneration,
    hp: Mapping[str, Any],
    prompts: list[str],
    seeds: list[int],
    progress_bar: bool,
) -> list[Image.Image]:
    """One image per prompt with ``unet`` and ``text_encoder`` in ``base``'s pipeline; seed ``seeds[i]`` for image i.

    ``hp``: the module's hyperparameters (``sampler``, ``image_size``, ``negative_prompt``, ``num_inference_steps``,
    ``guidance_scale``). ``progress_bar``: a bar over the denoising steps.
    """
    pipeline = base.pipeline(unet=unet, text_encoder=text_encoder, sampler=hp["sampler"])
    pipeline.set_progress_bar_config(disable=not progress_bar, leave=False, desc=f"generating {len(prompts)} images")
    size = hp["image_size"] or unet.config.sample_size * pipeline.vae_scale_factor
    return batched_generation(
        pipeline,
        prompts,
        seeds,
        negative_prompt=hp["negative_prompt"],
        num_inference_steps=hp["num_inference_steps"],
        guidance_scale=hp["guidance_scale"],
        height=size,
        width=size,
    )
