"""What the training loss takes from a batch: the step's seed, latents drawn from cached moments or from the VAE now,
text embeddings cached or computed now, and per-pixel loss weights from the face mask (issue #12)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from lightning_modules.diffusion_loss import face_loss_weights, sample_latents


def step_seed(batch_number: int, rank: int) -> int:
    """A seed that is a pure function of (run seed, batch number, rank): noise, timesteps and dropout of a
    batch are the same whether the run was resumed or not, whatever else consumed the global RNG."""
    base_seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    return (base_seed * 1_000_003 + batch_number * 101 + rank) % 2**63


def batch_latents(
    batch: dict[str, Any],
    latent_moments: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    scaling_factor: float,
) -> torch.Tensor:
    """Scaled latents of a batch: drawn from the cached latent moments, or from encoding the pixels now."""
    if "latent_mean" in batch:
        mean, std = batch["latent_mean"], batch["latent_std"]
    else:
        mean, std = latent_moments(batch["pixel_values"])
    return sample_latents(mean, std, scaling_factor)


def batch_text_embeddings(
    batch: dict[str, Any], text_encoder: torch.nn.Module, train_text_encoder: bool
) -> torch.Tensor:
    """The text encoder's hidden states: cached ones when the text encoder is frozen, else computed now."""
    if "encoder_hidden_states" in batch:
        if train_text_encoder:
            raise ValueError("Cached text embeddings cannot train a text-encoder LoRA: serve input_ids.")
        return batch["encoder_hidden_states"]
    return text_encoder(batch["input_ids"], return_dict=False)[0]


def face_mask_weights(
    batch: dict[str, Any], latents: torch.Tensor, face_weight: float, background_weight: float
) -> torch.Tensor:
    """Per-pixel loss weights (B, 1, h, w) from the batch's ``face_mask``, at the size of ``latents``."""
    if "face_mask" not in batch:
        raise ValueError(
            "model.face_loss_weight differs from model.background_loss_weight, but the batch has no face_mask: "
            "train with FaceDataModule (it serves the mask), or set both weights equal."
        )
    mask = batch["face_mask"].float()
    if mask.shape[-2:] != latents.shape[-2:]:
        mask = torch.nn.functional.interpolate(mask, size=latents.shape[-2:], mode="bilinear")
    return face_loss_weights(mask, face_weight, background_weight)
