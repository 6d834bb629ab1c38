"""The benchmark's inputs, written once per run: SD1.5 with random weights and synthetic captioned photos.

Nothing is downloaded: the model is built from the configs shipped in ``stable_diffusion/model_configs/sd15``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def build_model_dir(folder: Path, seed: int) -> Path:
    """Write SD1.5 with random weights in diffusers layout to ``folder`` once (reused when it is there)."""
    if (folder / "model_index.json").exists():
        return folder
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from stable_diffusion.single_file_checkpoint import SD15_CONFIG_DIR as CFG
    from stable_diffusion.tiny_sd import save_tiny_tokenizer

    print(f"writing SD1.5 with random weights to {folder} ...", flush=True)
    partial = folder.with_name(folder.name + ".partial")
    torch.manual_seed(seed)
    pipeline = StableDiffusionPipeline(
        vae=AutoencoderKL.from_config(AutoencoderKL.load_config(CFG / "vae")),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(CFG / "text_encoder")),
        tokenizer=save_tiny_tokenizer(partial / "tokenizer", model_max_length=77),
        unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CFG / "unet")),
        scheduler=PNDMScheduler.from_config(PNDMScheduler.load_config(CFG / "scheduler")),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(partial, safe_serialization=True)
    if folder.is_dir():
        folder.rmdir()  # an empty folder given by --model-dir; a non-empty one fails here rather than be mixed
    partial.rename(folder)
    return folder


def write_photos(folder: Path, count: int, size: int, seed: int) -> Path:
    """Smooth random RGB images (bicubic-upsampled 8x8 noise) as NNN.png beside NNN.txt captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"a photo of sks person, variation {i}\n", encoding="utf-8")
    return folder
