"""Batched generation: an image depends on its prompt and seed, not on its batch; out of memory halves the batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from devices import CPU_AND_CUDA
from PIL import Image

from lightning_modules.generation import BatchedGeneration
from lightning_modules.lora_diffusion import LoRADiffusion

GREY_LEVELS = 2  # float rounding across batch shapes (issue #9: "within 2 grey levels on the demo model")


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_batched_images_equal_one_at_a_time(tiny_sd, device):
    model = LoRADiffusion(str(tiny_sd), num_inference_steps=8, train_text_encoder=True).to(device)
    with torch.no_grad():  # a LoRA that changes the pictures, so its layers are part of what is compared
        for param in model.trainable_parameters():
            param.copy_(0.3 * torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
    prompts = ["a photo of eileen", "eileen on the moon", "a red car", "eileen smiling", "a photo of eileen"]
    seeds = [0, 1, 2, 3, 99]
    together = [np.asarray(im, dtype=np.int16) for im in model.generate(prompts, seeds)]
    alone = [np.asarray(model.generate([p], [s])[0], dtype=np.int16) for p, s in zip(prompts, seeds, strict=True)]
    for a, b in zip(together, alone, strict=True):
        assert np.abs(a - b).max() <= GREY_LEVELS
    # The tolerance still separates images: same prompt with another seed, or another prompt, differ far more.
    assert np.abs(together[0] - together[4]).max() > 10 * GREY_LEVELS
    assert np.abs(together[0] - together[2]).max() > 10 * GREY_LEVELS


class FakePipeline:
    """Returns one image per prompt coloured by its generator's seed; runs out of memory above ``fits`` prompts."""

    def __init__(self, fits: int) -> None:
        self.fits, self.calls = fits, []

    def __call__(self, prompts, negative_prompt, generator, output_type, **kwargs):
        self.calls.append((len(prompts), negative_prompt, kwargs))
        if len(prompts) > self.fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
        images = [Image.new("L", (1, 1), g.initial_seed()) for g in generator]
        return type("Output", (), {"images": images})


def test_out_of_memory_halves_the_batch_and_remembers():
    pipeline, generation = FakePipeline(fits=2), BatchedGeneration()
    seeds = [10, 11, 12, 13, 14]
    images = generation(pipeline, [f"p{i}" for i in range(5)], seeds, negative_prompt="ugly", guidance_scale=3.0)
    assert [im.getpixel((0, 0)) for im in images] == seeds  # every image kept its own seed, in order
    assert generation.max_batch == 2
    assert all(negative == ["ugly"] * n and kw == {"guidance_scale": 3.0} for n, negative, kw in pipeline.calls)
    pipeline.calls.clear()
    images = generation(pipeline, [f"p{i}" for i in range(5)], seeds)
    assert [n for n, _, _ in pipeline.calls] == [2, 2, 1]  # no second trip into out-of-memory
    assert [im.getpixel((0, 0)) for im in images] == seeds
    with pytest.raises(torch.cuda.OutOfMemoryError):
        BatchedGeneration()(FakePipeline(fits=0), ["p"], [1])
