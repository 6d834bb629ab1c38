"""The one DDPM noise-prediction loss that training and every test of it share."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

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


@contextmanager
def adapters_disabled(*models: torch.nn.Module) -> Iterator[None]:
    """Inside, each of ``models`` is its base model: every LoRA adapter off; on again afterwards, also on an error.

    diffusers' ``ModelMixin`` and transformers' ``PreTrainedModel`` both offer ``disable_adapters()`` /
    ``enable_adapters()`` for adapters added with ``add_adapter`` (their PEFT integration): each peft layer then
    computes its base layer alone. Re-enabling sets ``requires_grad`` of the active adapter's weights back to
    ``True`` (peft's ``BaseTunerLayer.enable_adapters``): the LoRA weights are trainable again, as they were. With
    ``torch.compile`` the off state is one more guarded graph of each compiled block, compiled once.
    """
    for model in models:
        model.disable_adapters()
    try:
        yield
    finally:
        for model in models:
            model.enable_adapters()


@dataclass(frozen=True)
class PriorPreservation:
    """Prior preservation without class images (issue #12): one regularisation prompt per sample of the batch.

    The LoRA model's prediction for the regularisation prompt must stay the frozen base model's own prediction
    (all adapters off) for the same noisy latents and timesteps, so the LoRA learns the person without pulling
    every person toward them. OneTrainer calls this "prior prediction"; DreamBooth (Ruiz et al. 2022,
    arXiv:2208.12242) gets the same pull from class images the base model generated beforehand.

    Args:
        weight: the prior loss's weight in the total loss (> 0).
        encoder_hidden_states: the trained text encoder's view of the prompts (B, L, D), for the LoRA prediction
            (with a text-encoder LoRA, computed with it, so gradients reach it).
        base_encoder_hidden_states: the base text encoder's view of the same prompts, for the target.
    """

    weight: float
    encoder_hidden_states: torch.Tensor
    base_encoder_hidden_states: torch.Tensor


@dataclass(frozen=True)
class DiffusionLoss:
    """The loss that trains and its parts.

    Attributes:
        loss: ``identity_loss + weight × prior_loss`` (``identity_loss`` without prior preservation).
        identity_loss: the photos' loss (face-weighted, min-SNR weighted as configured).
        prior_loss: the prior-preservation loss, ``None`` without it.
        noisy_latents: the noised latents both losses predicted from, float32 (B, C, h, w).
        timesteps: their timesteps (B,).
        prior_target: the base model's prediction for the regularisation prompts (no gradient).
        prior_prediction: the LoRA model's prediction for them.
    """

    loss: torch.Tensor
    identity_loss: torch.Tensor
    noisy_latents: torch.Tensor
    timesteps: torch.Tensor
    prior_loss: torch.Tensor | None = None
    prior_target: torch.Tensor | None = None
    prior_prediction: torch.Tensor | None = None


def _weighted_mse(
    prediction: torch.Tensor,
    target: torch.Tensor,
    scheduler: DDPMScheduler,
    timesteps: torch.Tensor,
    snr_gamma: float | None,
    loss_weight: torch.Tensor | None,
) -> torch.Tensor:
    if snr_gamma is None and loss_weight is None:
        return F.mse_loss(prediction.float(), target.float(), reduction="mean")
    loss = F.mse_loss(prediction.float(), target.float(), reduction="none")
    if loss_weight is not None:
        loss = loss * loss_weight.to(loss.device, loss.dtype)
    loss = loss.mean(dim=list(range(1, loss.ndim)))
    if snr_gamma is None:
        return loss.mean()
    return (loss * min_snr_weights(scheduler, timesteps, snr_gamma)).mean()


def diffusion_loss_terms(
    unet: UNet2DConditionModel,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    noise_offset: float = 0.0,
    snr_gamma: float | None = None,
    loss_weight: torch.Tensor | None = None,
    prior: PriorPreservation | None = None,
) -> DiffusionLoss:
    """Noise the (scaled) latents at uniform random timesteps and score the UNet's prediction (MSE).

    With ``loss_weight`` (per pixel, broadcast to the latents, e.g. (B, 1, h, w) from :func:`face_loss_weights`)
    each sample's loss is the mean over its pixels and channels of weight × squared error; min-SNR then weighs
    each sample and the batch is averaged. Draws from the global torch RNG: the caller decides its seed.

    With ``prior`` the UNet (with peft adapters) also predicts for the regularisation prompts from the same noisy
    latents and timesteps, and the target is its own prediction with the adapters off (:func:`adapters_disabled`),
    without gradient. Its loss has the photos' min-SNR weights but no ``loss_weight``: the face mask says where the
    person is in the photo, and the prior should hold everywhere. The same weighting for both terms keeps
    ``prior.weight`` the ratio between them at every timestep, as in kohya's sd-scripts, where regularisation
    images pass through the same per-sample min-SNR weighting (diffusers' DreamBooth example leaves the prior
    term unweighted). Total: identity + ``prior.weight`` × prior. Without ``prior`` nothing is drawn or run
    besides the photos' pass, so a run without it trains exactly as before.
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
    unet_input = noisy_latents.to(unet.dtype)
    target = loss_target(scheduler, latents, noise, timesteps)
    if prior is None:
        prediction = unet(unet_input, timesteps, encoder_hidden_states, return_dict=False)[0]
        identity = _weighted_mse(prediction, target, scheduler, timesteps, snr_gamma, loss_weight)
        return DiffusionLoss(identity, identity, noisy_latents, timesteps)
    # The target first, so the adapters are on again before the pass that trains (and before its backward, which
    # recomputes that pass's activations under gradient checkpointing).
    with torch.no_grad(), adapters_disabled(unet):
        prior_target = unet(unet_input, timesteps, prior.base_encoder_hidden_states, return_dict=False)[0]
    # Photos and regularisation prompts in one batch of 2B (as diffusers' DreamBooth example does with class
    # images): one UNet pass instead of two, the same memory; GroupNorm is per sample, so they do not mix.
    both = unet(
        torch.cat([unet_input, unet_input]),
        torch.cat([timesteps, timesteps]),
        torch.cat([encoder_hidden_states, prior.encoder_hidden_states.to(encoder_hidden_states.dtype)]),
        return_dict=False,
    )[0]
    prediction, prior_prediction = both.chunk(2)
    identity = _weighted_mse(prediction, target, scheduler, timesteps, snr_gamma, loss_weight)
    prior_loss = _weighted_mse(prior_prediction, prior_target, scheduler, timesteps, snr_gamma, None)
    return DiffusionLoss(
        identity + prior.weight * prior_loss,
        identity,
        noisy_latents,
        timesteps,
        prior_loss,
        prior_target,
        prior_prediction,
    )
