"""Prior preservation without class images (issue #12 item 3): for the regularisation prompts the target is the base
model's own prediction, with every adapter off, on the same noisy latents as the photos' loss.

References are computed apart from the code under test: a fresh UNet and text encoder loaded from the tiny model's
folder without any adapter, the LoRA model's own forward passes, and min-SNR written out from the scheduler's ᾱ.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel

from datamodules.data_settings import check_prior_settings
from datamodules.face_data_module import FaceDataModule
from lightning_modules.lora_diffusion import LoRADiffusion

PROMPTS = ["a photo of a man", "a photo of a woman"]
WEIGHT = 0.5
GAMMA = 5.0


def lora_module(tiny_sd: Path, seed: int = 1, **settings) -> LoRADiffusion:
    """The tiny model with rank-4 LoRA on UNet and text encoder whose B matrices are random, not zero: the adapters
    change every prediction (at peft's init, B = 0, the LoRA model would be the base model)."""
    settings = {"train_text_encoder": True, "prior_loss_weight": WEIGHT, "snr_gamma": GAMMA} | settings
    torch.manual_seed(seed)  # peft draws the A matrices from the global RNG
    module = LoRADiffusion(str(tiny_sd), lora_rank=4, lora_alpha=4, **settings)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return module


def photo_batch(tokenizer, size: int) -> dict[str, torch.Tensor]:
    captions = [f"a photo of sks person {i}" for i in range(size)]
    return {
        "pixel_values": torch.rand(size, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1,
        "input_ids": tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt").input_ids,
    }


def tokens(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def step(tiny_sd, tiny_tokenizer):
    """One training step's loss terms with the prior on, and which UNet passes the step made."""
    module = lora_module(tiny_sd)
    module.use_prior_prompts(PROMPTS)
    calls = []
    hook = module.unet.register_forward_pre_hook(
        lambda _, args: calls.append((args[0].detach().clone(), args[1].clone(), torch.is_grad_enabled()))
    )
    terms = module.loss_terms(photo_batch(tiny_tokenizer, size=6))
    hook.remove()
    return module, terms, calls


@pytest.fixture(scope="module")
def references(tiny_sd, tiny_tokenizer, step):
    """Per prompt: the base model's prediction (a fresh UNet and text encoder, no adapter) and the LoRA model's, on
    the step's noisy latents and timesteps."""
    module, terms, _ = step
    base_unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").eval()
    base_text_encoder = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder").eval()
    assert not hasattr(base_unet, "peft_config")  # really no adapter
    ids = tokens(tiny_tokenizer, PROMPTS)
    noisy, timesteps = terms.noisy_latents, terms.timesteps
    batch = noisy.shape[0]
    with torch.no_grad():
        base_hidden = base_text_encoder(ids, return_dict=False)[0]
        lora_hidden = module.text_encoder(ids, return_dict=False)[0]
        base = [base_unet(noisy, timesteps, h.expand(batch, -1, -1), return_dict=False)[0] for h in base_hidden]
        lora = [module.unet(noisy, timesteps, h.expand(batch, -1, -1), return_dict=False)[0] for h in lora_hidden]
    return base, lora


def drawn_prompts(terms, base: list[torch.Tensor]) -> list[int]:
    """For each sample, the one prompt whose base prediction the target equals."""
    drawn = []
    for b in range(terms.prior_target.shape[0]):
        matches = [p for p, pred in enumerate(base) if torch.allclose(terms.prior_target[b], pred[b], atol=1e-5)]
        assert len(matches) == 1, f"sample {b}: the target matches prompts {matches}"
        drawn.append(matches[0])
    return drawn


def test_prior_target_is_the_base_models_own_prediction(step, references):
    module, terms, calls = step
    base, lora = references
    # The adapters matter (else the test could not fail), and the two prompts give different predictions.
    assert (lora[0] - base[0]).abs().max() > 1e-2
    assert (base[0] - base[1]).abs().max() > 1e-3
    drawn = drawn_prompts(terms, base)
    assert sorted(set(drawn)) == [0, 1]  # one prompt drawn per sample, both prompts in this batch
    for b, p in enumerate(drawn):
        # The prediction is the LoRA model's (UNet and text-encoder LoRA on) for the same prompt and noisy latents...
        torch.testing.assert_close(terms.prior_prediction[b], lora[p][b], rtol=1e-4, atol=1e-5)
        # ... and it is not the target: the loss has something to pull.
        assert (terms.prior_prediction[b] - terms.prior_target[b]).abs().max() > 1e-2
    # Two UNet passes: the base model's without gradient, then photos and prompts together (2B) with gradient, on
    # the very noisy latents and timesteps of the photos' loss.
    assert [grad for *_, grad in calls] == [False, True]
    (base_in, base_t, _), (both_in, both_t, _) = calls
    assert torch.equal(base_in, terms.noisy_latents) and torch.equal(base_t, terms.timesteps)
    assert torch.equal(both_in, torch.cat([terms.noisy_latents] * 2))
    assert torch.equal(both_t, torch.cat([terms.timesteps] * 2))
    # Afterwards every adapter is on again and every LoRA weight still trains.
    assert not any(layer.disable_adapters for layer in module._lora_layers)
    assert module.trainable_names() == {n for n, _ in module.named_parameters() if ".lora_" in n}


def test_total_is_identity_plus_weight_times_prior_by_hand(step, references):
    module, terms, _ = step
    base, lora = references
    drawn = drawn_prompts(terms, base)
    target = torch.stack([base[p][b] for b, p in enumerate(drawn)])
    prediction = torch.stack([lora[p][b] for b, p in enumerate(drawn)])
    # Min-SNR-γ for epsilon targets, written out: min(SNR, γ) / SNR with SNR = ᾱ / (1 − ᾱ).
    a = module.noise_scheduler.alphas_cumprod.double().numpy()[terms.timesteps.numpy()]
    snr = a / (1 - a)
    per_sample = ((prediction - target) ** 2).mean(dim=(1, 2, 3)).double().numpy()
    prior = float(np.mean(per_sample * np.minimum(snr, GAMMA) / snr))
    assert terms.prior_loss.item() == pytest.approx(prior, rel=1e-4, abs=1e-9)
    assert prior > 0
    total = terms.identity_loss.item() + WEIGHT * prior
    assert terms.loss.item() == pytest.approx(total, rel=1e-5)


def test_prior_loss_trains_both_loras_and_is_zero_at_init(tiny_sd, tiny_tokenizer):
    batch = photo_batch(tiny_tokenizer, size=2)
    # peft's init (B = 0): the LoRA model is the base model, so the prior costs nothing yet.
    fresh = LoRADiffusion(str(tiny_sd), train_text_encoder=True, prior_loss_weight=WEIGHT)
    fresh.use_prior_prompts(PROMPTS)
    assert fresh.loss_terms(batch).prior_loss.item() < 1e-8
    # With LoRA weights that change the model, the prior loss alone sends gradient into both LoRAs (through the
    # regularisation prompts' live text-encoder LoRA view, too).
    module = lora_module(tiny_sd)
    module.use_prior_prompts(PROMPTS)
    module.loss_terms(batch).prior_loss.backward()
    for part in ("unet", "text_encoder"):
        grads = [p.grad for n, p in module.named_parameters() if n.startswith(part) and p.requires_grad]
        assert grads and all(g is not None for g in grads) and any(g.abs().max() > 0 for g in grads), part


def test_gradient_checkpointing_recomputes_with_the_adapters_on(tiny_sd, tiny_tokenizer):
    # The backward pass recomputes the trained pass; were the adapters still off then, the gradients would differ.
    batch = photo_batch(tiny_tokenizer, size=2)
    grads = {}
    for checkpointing in (False, True):
        module = lora_module(tiny_sd, gradient_checkpointing=checkpointing)
        module.use_prior_prompts(PROMPTS)
        module.training_step(batch, 0).backward()
        grads[checkpointing] = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_weight_zero_trains_exactly_as_without_the_feature(tiny_sd, tiny_tokenizer, demo_photos):
    batch = photo_batch(tiny_tokenizer, size=2)
    # The data module hands weight-0 models no prompts (and says so).
    data = FaceDataModule(data_dir=str(demo_photos), resolution=64, prior_prompts=PROMPTS)
    results = []
    for with_prompts in (False, True):
        module = lora_module(tiny_sd, prior_loss_weight=0.0, lora_dropout=0.1)  # 0: the default
        if with_prompts:
            with pytest.warns(UserWarning, match=r"data.prior_prompts .* model.prior_loss_weight is 0"):
                assert data._prior_prompts_for(module) == []
            module.use_prior_prompts(PROMPTS)  # even set by hand, weight 0 is off
        optimizer = torch.optim.SGD(module.trainable_parameters(), lr=0.1)
        losses = []
        for _ in range(2):
            optimizer.zero_grad()
            loss = module.training_step(batch, 0)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        results.append((losses, {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}))
    (losses, weights), (zero_losses, zero_weights) = results
    assert all(torch.equal(a, b) for a, b in zip(losses, zero_losses, strict=True))
    assert weights.keys() == zero_weights.keys() and all(torch.equal(weights[k], zero_weights[k]) for k in weights)


def test_bad_settings_fail_naming_the_setting(tiny_sd, tiny_tokenizer, tmp_path):
    # The weight is checked before the base model loads (this path does not exist).
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="model.prior_loss_weight"):
            LoRADiffusion(str(tmp_path / "no-such-model"), prior_loss_weight=bad)
    # A weight without prompts: one error naming both settings (train.py can check it before loading, too).
    for prompts in (None, [], ["  "]):
        with pytest.raises(ValueError, match=r"model.prior_loss_weight 0.5 needs .*data.prior_prompts"):
            check_prior_settings(0.5, prompts)
    with pytest.raises(FileNotFoundError, match="data.prior_prompts"):
        check_prior_settings(0.5, str(tmp_path / "missing.txt"))
    (tmp_path / "prompts.txt").write_text("a photo of a man\n\na photo of a woman\n", encoding="utf-8")
    assert check_prior_settings(0.5, str(tmp_path / "prompts.txt")) == PROMPTS
    assert check_prior_settings(0.0, None) == []
    # Without the data module (the Python API), the first step says what is missing.
    module = LoRADiffusion(str(tiny_sd), prior_loss_weight=1.0)
    with pytest.raises(ValueError, match=r"model.prior_loss_weight 1.0 needs .*data.prior_prompts"):
        module.training_step(photo_batch(tiny_tokenizer, size=1), 0)
    with pytest.raises(ValueError, match="data.prior_prompts"):
        module.use_prior_prompts([])


def test_cli_weight_without_prompts_is_one_clear_error(demo_cli, tmp_path, capsys):
    from train import main

    with pytest.raises(SystemExit) as info:
        main(demo_cli("fit", tmp_path, "--model.prior_loss_weight=0.5"))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "model.prior_loss_weight 0.5" in err and "data.prior_prompts" in err and "Traceback" not in err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_bf16_frozen_weights_under_autocast(tiny_sd, tiny_tokenizer):
    module = lora_module(tiny_sd, frozen_dtype="bfloat16")
    module.use_prior_prompts(PROMPTS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = module.loss_terms(photo_batch(tiny_tokenizer, size=2))
    terms.loss.backward()
    assert torch.isfinite(terms.loss) and terms.prior_loss > 0
    grads = [p.grad for p in module.trainable_parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 for g in grads)


@pytest.mark.slow
def test_resume_with_prior_preservation_is_exact(demo_cli, tmp_path):
    """4 steps in one go = 2 steps, stop, resume for 2 more (mid-epoch: 7 photos, batch 2); with the prior on the LoRA
    trains differently than with weight 0, and weight 0 with prompts trains exactly as without them."""
    from test_train_cli import lora_tensors, read_scalars

    from train import main

    fast = [
        "--trainer.max_steps=4",
        "--trainer.log_every_n_steps=1",
        "--trainer.limit_val_batches=0",
        "--validation.baseline=false",
        "--validation.at_end=false",
        "--validation.every_n_steps=0",
        "--checkpoint.every_n_train_steps=2",
        "--model.lora_dropout=0.1",  # dropout draws from the step's RNG too
    ]
    prior = ["--model.prior_loss_weight=0.5", "--data.prior_prompts=[a photo of a woman, a photo of a man]"]

    def last(cli) -> dict[str, torch.Tensor]:
        return lora_tensors(Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt")

    whole = main(demo_cli("fit", tmp_path / "whole", *fast, *prior))
    scalars = read_scalars(Path(whole.trainer.log_dir))
    assert [s for s, _ in scalars["train/prior_loss"]] == [s for s, _ in scalars["train/identity_loss"]] == [0, 1, 2, 3]
    for (_, total), (_, identity), (_, prior_loss) in zip(
        scalars["train/loss"], scalars["train/identity_loss"], scalars["train/prior_loss"], strict=True
    ):
        assert total == pytest.approx(identity + 0.5 * prior_loss, rel=1e-5)
    stop = '--trainer.callbacks+={"class_path": "test_train_cli.StopAt", "init_args": {"step": 2}}'
    half = main(demo_cli("fit", tmp_path / "half", *fast, *prior, stop))
    half_ckpt = Path(half.trainer.log_dir) / "checkpoints" / "step000002.ckpt"
    resumed = main(demo_cli("fit", tmp_path / "half", *fast, *prior, f"--ckpt_path={half_ckpt}"))
    assert resumed.trainer.global_step == 4
    a, b = last(whole), last(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Weight 0 with prompts = no prior at all, bit for bit; and the prior did change what was trained.
    plain = last(main(demo_cli("fit", tmp_path / "plain", *fast)))
    zero = last(main(demo_cli("fit", tmp_path / "zero", *fast, "--model.prior_loss_weight=0", prior[1])))
    assert all(torch.equal(plain[k], zero[k]) for k in plain)
    assert any(not torch.equal(plain[k], a[k]) for k in plain)
