"""Generate images in as few pipeline calls as GPU memory allows, each image a function of its prompt and seed."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image


class BatchedGeneration:
    """Calls a Stable Diffusion pipeline on as many prompts at once as fit, halving the batch on CUDA OOM.

    The largest batch that fitted is remembered, so a later validation does not run out of memory again. Every
    image gets its own CPU generator: its pixels depend on its prompt and seed only, not on its batch (up to
    float rounding, a grey level or two; issue #9).

    Args:
        max_batch: images per pipeline call at most (``None``: all of them at once).
    """

    def __init__(self, max_batch: int | None = None) -> None:
        self.max_batch = max_batch

    def __call__(
        self, pipeline: StableDiffusionPipeline, prompts: list[str], seeds: list[int], **kwargs
    ) -> list[Image.Image]:
        images: list[Image.Image] = []
        while len(images) < len(prompts):
            chunk = slice(len(images), len(images) + (self.max_batch or len(prompts)))
            try:
                images += self.call(pipeline, prompts[chunk], seeds[chunk], kwargs)
            except torch.cuda.OutOfMemoryError:
                tried = len(prompts[chunk])
                if tried == 1:
                    raise
                torch.cuda.empty_cache()
                self.max_batch = tried // 2
                rank_zero_info(
                    f"Generating {tried} images at once ran out of GPU memory: {self.max_batch} at a time now."
                )
        return images

    @staticmethod
    def call(pipeline, prompts: list[str], seeds: list[int], kwargs: dict) -> list[Image.Image]:
        # CPU generators: the same seed gives the same starting noise on any device.
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        kwargs = dict(kwargs)
        negative = kwargs.pop("negative_prompt", None)
        return pipeline(
            prompts,
            negative_prompt=[negative] * len(prompts) if negative else None,
            generator=generators,
            output_type="pil",
            **kwargs,
        ).images
