"""The recipe of diffusers' ``train_text_to_image_lora.py`` as a plain PyTorch loop: the baseline (b) of
``train_speed.py``. VAE and text encoder run every step, the LoRA weights are float32 under autocast, data loads
inline, nothing is compiled."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from speed_settings import LR, SETTINGS, SNR_GAMMA, TEXT_ENCODER_TARGETS, UNET_TARGETS, StepClock
from torch.utils.data import DataLoader, Dataset


class PhotoDataset(Dataset):
    """The example's preprocessing: short side to ``resolution`` (bicubic), center crop, [-1, 1], token ids."""

    def __init__(self, folder: Path, tokenizer: Any, resolution: int) -> None:
        self.images, self.tokenizer, self.resolution = sorted(folder.glob("*.png")), tokenizer, resolution

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        path, size = self.images[index], self.resolution
        image = Image.open(path).convert("RGB")
        scale = size / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        image = image.crop((left, top, left + size, top + size))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        caption = path.with_suffix(".txt").read_text(encoding="utf-8").strip()
        max_length = self.tokenizer.model_max_length
        ids = self.tokenizer(caption, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        return {"pixel_values": pixels, "input_ids": ids.input_ids[0]}


def run_plain(args: argparse.Namespace, name: str, model_dir: Path, photos: Path, max_steps: int) -> dict[str, Any]:
    """The recipe of diffusers' train_text_to_image_lora.py as a plain PyTorch loop (no accelerate, no compile)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import compute_snr
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    s, device, bf16 = SETTINGS[name], torch.device(args.device), args.precision == "bf16-mixed"
    weight_dtype = torch.bfloat16 if bf16 else torch.float32
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder")
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    load_s = time.perf_counter() - start
    # "first step s" counts from here, as likeness's counts from trainer.fit
    clock = StepClock(device, synced_steps=args.warmup + args.steps)
    for model in (vae, text_encoder, unet):
        model.requires_grad_(False)
        model.to(device, dtype=weight_dtype)
    lora = {"r": s.rank, "lora_alpha": s.alpha, "init_lora_weights": "gaussian"}
    unet.add_adapter(LoraConfig(**lora, target_modules=UNET_TARGETS))
    if s.text_encoder:
        text_encoder.add_adapter(LoraConfig(**lora, target_modules=TEXT_ENCODER_TARGETS))
    params = [p for model in (unet, text_encoder) for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    unet.train()
    text_encoder.train(s.text_encoder)
    optimizer = torch.optim.AdamW(params, lr=LR)
    loader = DataLoader(PhotoDataset(photos, tokenizer, args.resolution), batch_size=s.batch, shuffle=True)
    # accelerate autocasts the forward of every prepared model: the UNet, and the text encoder when it trains.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    for batch in itertools.islice(itertools.chain.from_iterable(itertools.repeat(loader)), max_steps):
        pixels = batch["pixel_values"].to(device, dtype=weight_dtype)
        input_ids = batch["input_ids"].to(device)
        clock.start()
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device).long()
        noisy = scheduler.add_noise(latents, noise, t)
        with autocast:
            hidden = text_encoder(input_ids, return_dict=False)[0]
            prediction = unet(noisy, t, hidden, return_dict=False)[0]
        snr = compute_snr(scheduler, t)
        weights = torch.clamp(snr, max=SNR_GAMMA) / snr  # min-SNR-gamma for epsilon prediction
        loss = F.mse_loss(prediction.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
        (loss * weights).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        clock.stop()
    total_s = time.perf_counter() - clock.origin
    return clock.summary(args, name, "plain", s.batch, load_s=load_s, total_s=total_s)
