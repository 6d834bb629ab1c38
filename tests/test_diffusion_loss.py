"""Loss targets and min-SNR weights against formulas computed independently from the betas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from lightning_modules.diffusion_loss import (
    PriorPreservation,
    diffusion_loss_terms,
    face_loss_weights,
    loss_target,
    min_snr_weights,
    sample_latents,
)


def sd_scheduler(prediction_type: str) -> DDPMScheduler:
    return DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=prediction_type
    )


def alphas_cumprod_numpy() -> np.ndarray:
    # SD1's "scaled_linear" schedule, written out: betas linear in sqrt space.
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1 - betas)


def test_targets_epsilon_and_v():
    torch.manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    a = torch.from_numpy(alphas_cumprod_numpy()[t.numpy()]).float().view(-1, 1, 1, 1)
    assert loss_target(sd_scheduler("epsilon"), x0, noise, t) is noise
    expected_v = a.sqrt() * noise - (1 - a).sqrt() * x0  # Salimans & Ho 2022, eq. for v
    torch.testing.assert_close(loss_target(sd_scheduler("v_prediction"), x0, noise, t), expected_v)
    with pytest.raises(ValueError, match="prediction_type"):
        loss_target(sd_scheduler("sample"), x0, noise, t)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights(prediction_type):
    t = torch.tensor([0, 10, 100, 400, 999])
    a = alphas_cumprod_numpy()[t.numpy()]
    snr = a / (1 - a)
    gamma = 5.0
    denominator = snr if prediction_type == "epsilon" else snr + 1
    expected = np.minimum(snr, gamma) / denominator
    got = min_snr_weights(sd_scheduler(prediction_type), t, gamma).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    # High-noise steps (SNR < gamma) keep weight 1 for epsilon; low-noise steps are down-weighted.
    if prediction_type == "epsilon":
        assert got[-1] == pytest.approx(1.0) and got[0] < 0.01


class Recorder(torch.nn.Module):
    """A stand-in UNet that returns a fixed prediction and records what it was given."""

    def __init__(self, prediction):
        super().__init__()
        self.prediction = prediction
        self.dtype = torch.float32

    def forward(self, noisy, timesteps, hidden, return_dict=False):
        self.noisy, self.timesteps, self.hidden = noisy, timesteps, hidden
        return (self.prediction,)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("snr_gamma", [None, 5.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_diffusion_loss_matches_a_manual_computation(prediction_type, snr_gamma, weighted):
    scheduler = sd_scheduler(prediction_type)
    latents = torch.randn(2, 4, 32, 32)
    hidden = torch.randn(2, 77, 32)
    prediction = torch.randn(2, 4, 32, 32)
    unet = Recorder(prediction)
    weight = torch.rand(2, 1, 32, 32) * 3 if weighted else None  # one weight per latent pixel, all channels

    torch.manual_seed(7)
    loss = diffusion_loss_terms(unet, scheduler, latents, hidden, snr_gamma=snr_gamma, loss_weight=weight).loss

    # Replay the same random draws by hand: noise, timesteps.
    torch.manual_seed(7)
    noise = torch.randn_like(latents)
    t = torch.randint(0, 1000, (2,))
    assert torch.equal(unet.timesteps, t) and unet.hidden is hidden
    a = torch.from_numpy(alphas_cumprod_numpy()[t.numpy()]).float().view(-1, 1, 1, 1)
    torch.testing.assert_close(unet.noisy, a.sqrt() * latents + (1 - a).sqrt() * noise, rtol=1e-4, atol=1e-4)
    target = noise if prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * latents
    squared = (prediction - target) ** 2
    if weighted:  # written out as a sum over pixels and channels, divided by their count
        per_sample = torch.stack([(squared[b] * weight[b, 0][None]).sum() / (4 * 32 * 32) for b in range(2)])
    else:
        per_sample = squared.mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        snr = (a / (1 - a)).flatten()
        per_sample = per_sample * torch.clamp(snr, max=snr_gamma) / (snr if prediction_type == "epsilon" else snr + 1)
    torch.testing.assert_close(loss, per_sample.mean(), rtol=1e-4, atol=1e-6)


class AdapterRecorder(torch.nn.Module):
    """A stand-in UNet with adapters: the base model's fixed prediction with them off; with them on, fixed
    predictions for the photos and for the regularisation prompts (a batch of both). Records every call."""

    def __init__(self, prediction, prior_prediction, base_prediction, fail_base: bool = False):
        super().__init__()
        self.prediction, self.prior_prediction, self.base_prediction = prediction, prior_prediction, base_prediction
        self.dtype = torch.float32
        self.adapters_on, self.fail_base = True, fail_base
        self.calls = []

    def disable_adapters(self):
        self.adapters_on = False

    def enable_adapters(self):
        self.adapters_on = True

    def forward(self, noisy, timesteps, hidden, return_dict=False):
        self.calls.append({"noisy": noisy, "t": timesteps, "hidden": hidden, "on": self.adapters_on})
        self.calls[-1]["grad"] = torch.is_grad_enabled()
        if not self.adapters_on:
            if self.fail_base:
                raise RuntimeError("out of memory")
            return (self.base_prediction,)
        return (torch.cat([self.prediction, self.prior_prediction]),)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_prior_preservation_by_hand(prediction_type, snr_gamma):
    """Total = photos' loss (face-weighted) + weight × prior loss, the prior's target the adapters-off prediction on
    the same noisy latents and timesteps; min-SNR weighs both, the face mask only the photos'."""
    scheduler = sd_scheduler(prediction_type)
    g = torch.Generator().manual_seed(0)
    latents, prediction, prior_prediction, base_prediction = (torch.randn(3, 4, 16, 16, generator=g) for _ in "abcd")
    hidden, prior_hidden, base_hidden = (torch.randn(3, 77, 32, generator=g) for _ in "abc")
    weight = torch.rand(3, 1, 16, 16, generator=g) * 3
    unet = AdapterRecorder(prediction, prior_prediction, base_prediction)
    prior = PriorPreservation(0.25, prior_hidden, base_hidden)

    torch.manual_seed(7)
    terms = diffusion_loss_terms(unet, scheduler, latents, hidden, snr_gamma=snr_gamma, loss_weight=weight, prior=prior)

    torch.manual_seed(7)
    noise = torch.randn_like(latents)
    t = torch.randint(0, 1000, (3,))
    a = torch.from_numpy(alphas_cumprod_numpy()[t.numpy()]).float().view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    base_call, train_call = unet.calls
    # The base model (adapters off, no gradient) on the photos' noisy latents and timesteps, the base prompt view...
    assert not base_call["on"] and not base_call["grad"] and base_call["hidden"] is base_hidden
    torch.testing.assert_close(base_call["noisy"], noisy, rtol=1e-4, atol=1e-4)
    assert torch.equal(base_call["t"], t)
    # ... then photos and prompts in one batch, adapters on, with gradient.
    assert train_call["on"] and train_call["grad"] and torch.equal(train_call["t"], torch.cat([t, t]))
    assert torch.equal(train_call["noisy"], torch.cat([base_call["noisy"]] * 2))
    assert torch.equal(train_call["hidden"], torch.cat([hidden, prior_hidden]))
    assert unet.adapters_on

    target = noise if prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * latents
    identity = torch.stack(
        [((prediction[b] - target[b]) ** 2 * weight[b, 0][None]).sum() / (4 * 16 * 16) for b in range(3)]
    )
    prior_loss = ((prior_prediction - base_prediction) ** 2).mean(dim=(1, 2, 3))  # no face weights
    if snr_gamma is not None:
        snr = (a / (1 - a)).flatten()
        snr_weight = torch.clamp(snr, max=snr_gamma) / (snr if prediction_type == "epsilon" else snr + 1)
        identity, prior_loss = identity * snr_weight, prior_loss * snr_weight
    torch.testing.assert_close(terms.identity_loss, identity.mean(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(terms.prior_loss, prior_loss.mean(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(terms.loss, identity.mean() + 0.25 * prior_loss.mean(), rtol=1e-4, atol=1e-6)
    assert torch.equal(terms.prior_target, base_prediction) and torch.equal(terms.prior_prediction, prior_prediction)


def test_adapters_come_back_on_after_an_error():
    x = torch.zeros(1, 4, 8, 8)
    unet = AdapterRecorder(x, x, x, fail_base=True)
    prior = PriorPreservation(1.0, torch.zeros(1, 77, 32), torch.zeros(1, 77, 32))
    with pytest.raises(RuntimeError, match="out of memory"):
        diffusion_loss_terms(unet, sd_scheduler("epsilon"), x, torch.zeros(1, 77, 32), prior=prior)
    assert unet.adapters_on


def test_sample_latents_draws_as_the_vae_does(tiny_sd):
    """Cached moments give the very latents that encoding now and ``latent_dist.sample()`` would give."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae")
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
    torch.manual_seed(5)
    want = dist.sample() * vae.config.scaling_factor
    torch.manual_seed(5)
    got = sample_latents(dist.mean, dist.std, vae.config.scaling_factor)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert (got - dist.mean * vae.config.scaling_factor).abs().max() > 1e-3  # a draw, not the mean


def test_noise_offset_shifts_each_channel():
    scheduler = sd_scheduler("epsilon")
    latents = torch.zeros(1, 4, 32, 32)
    hidden = torch.zeros(1, 77, 32)
    unet = Recorder(torch.zeros(1, 4, 32, 32))
    torch.manual_seed(3)
    plain = diffusion_loss_terms(unet, scheduler, latents, hidden).loss
    torch.manual_seed(3)
    offset = diffusion_loss_terms(unet, scheduler, latents, hidden, noise_offset=10.0).loss
    # With a zero prediction the loss is E[noise^2]: a large per-channel offset raises it far above 1.
    assert plain.item() == pytest.approx(1.0, abs=0.2)
    assert offset.item() > 5


def test_face_loss_weights_by_hand():
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, 0, :2, :2] = 1  # a face on 4 of 16 pixels
    mask[0, 0, 2, 0] = 0.5  # and a feathered pixel
    weights = face_loss_weights(mask, face_weight=2.0, background_weight=0.5)
    raw = {1.0: 2.0, 0.5: 1.25, 0.0: 0.5}  # background + (face - background) * mask
    mean = (4 * 2.0 + 1.25 + 11 * 0.5) / 16
    assert weights[0, 0, 0, 0].item() == pytest.approx(raw[1.0] / mean)
    assert weights[0, 0, 2, 0].item() == pytest.approx(raw[0.5] / mean)
    assert weights[0, 0, 3, 3].item() == pytest.approx(raw[0.0] / mean)
    assert weights[0].mean().item() == pytest.approx(1.0)  # the loss keeps its scale
    torch.testing.assert_close(weights[1], torch.ones(1, 4, 4))  # no face: an even loss
