"""The one DDPM noise-prediction loss that training and every test of it share."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import compute_snr


def loss_target(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet must predict: the noise (epsilon) or the velocity v = sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x₀
    (Salimans & Ho 2022, "Progressive Distillation"), as the scheduler's ``prediction_type`` says."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"Unsupported prediction_type {prediction_type!r}: use epsilon or v_prediction.")


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023, arXiv:2303.09556): min(SNR, γ)/SNR for epsilon targets and
    min(SNR, γ)/(SNR + 1) for v targets, since the v loss already weighs each step by SNR + 1."""
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def face_loss_weights(mask: torch.Tensor, face_weight: float, background_weight: float) -> torch.Tensor:
    """Per-pixel loss weights from a face mask in [0, 1] of shape (B, 1, h, w): ``background_weight`` where the mask
    is 0, ``face_weight`` where it is 1, then scaled so that each image's weights average 1.

    Averaging 1 keeps the loss on the scale of the plain MSE, so learning rates and the per-sample min-SNR weights
    mean what they meant without it; only where in the image the loss comes from shifts. An image without a face
    (mask all 0) gets weight 1 everywhere.
    """
    weights = background_weight + (face_weight - background_weight) * mask.float()
    return weights / weights.mean(dim=(1, 2, 3), keepdim=True)


def sample_latents(mean: torch.Tensor, std: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """A draw from the VAE's latent distribution N(mean, std²), scaled for the UNet, in float32.

    The same draw whether the moments come from the latent cache or from encoding now, so a cached run trains
    like an uncached one. Draws from the global torch RNG.
    """
    # torch.randn of the shape, not randn_like: a VAE's mean is a strided view, and randn_like follows strides.
    sample = torch.randn(mean.shape, dtype=torch.float32, device=mean.device)
    return (mean.float() + std.float() * sample) * scaling_factor


def diffusion_loss(
    unet: UNet2DConditionModel,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    noise_offset: float = 0.0,
    snr_gamma: float | None = None,
    loss_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Noise the (scaled) latents at uniform random timesteps and score the UNet's prediction (MSE).

    With ``loss_weight`` (per pixel, broadcast to the latents, e.g. (B, 1, h, w) from :func:`face_loss_weights`)
    each sample's loss is the mean over its pixels and channels of weight × squared error; min-SNR then weighs
    each sample and the batch is averaged. Draws from the global torch RNG: the caller decides its seed.
    """
    # contiguous: randn_like follows strides, and latents encoded now or read from the cache must draw alike.
    latents = latents.float().contiguous()
    noise = torch.randn_like(latents)
    if noise_offset:
        # Offset noise (Guttenberg 2023, crosslabs.org "diffusion with offset noise"): lets the model learn
        # overall brightness, which zero-mean noise at the last timestep never removes.
        noise = noise + noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=latents.device)
    batch_size = latents.shape[0]
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), device=latents.device).long()
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(noisy_latents.to(unet.dtype), timesteps, encoder_hidden_states, return_dict=False)[0]
    target = loss_target(scheduler, latents, noise, timesteps)
    if snr_gamma is None and loss_weight is None:
        return F.mse_loss(prediction.float(), target.float(), reduction="mean")
    loss = F.mse_loss(prediction.float(), target.float(), reduction="none")
    if loss_weight is not None:
        loss = loss * loss_weight.to(loss.device, loss.dtype)
    loss = loss.mean(dim=list(range(1, loss.ndim)))
    if snr_gamma is None:
        return loss.mean()
    return (loss * min_snr_weights(scheduler, timesteps, snr_gamma)).mean()
