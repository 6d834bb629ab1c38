"""From settings to the model that trains: the ``model.*`` numbers checked before the base model loads, the base
model loaded, its frozen VAE, text encoder and UNet given peft LoRA adapters (float32 LoRA weights), and the speed
options (gradient checkpointing, regional compilation)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from lightning.pytorch.utilities import rank_zero_warn
from peft import LoraConfig
from transformers import CLIPTextModel

from lightning_modules.mixed_precision import checkpoint_function, compile_repeated_blocks
from stable_diffusion.base_model import BaseModel, load_base_model

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def check_settings(hp: Mapping[str, Any]) -> None:
    """Refuse out-of-range ``model.*`` settings (``hp``: the module's hyperparameters), naming them."""
    for setting in ("lora_rank", "lora_alpha", "text_encoder_lr", "face_loss_weight", "background_loss_weight"):
        value = hp[setting]
        if value is not None and not value > 0:  # `not >` also catches NaN
            raise ValueError(f"model.{setting} {value}: give a positive number.")
    snr_gamma = hp["snr_gamma"]
    if snr_gamma is not None and not (snr_gamma > 0 and math.isfinite(snr_gamma)):
        # min(SNR, γ)/SNR is 0 at γ = 0 (nothing trains) and negative below (the loss climbs: training in reverse).
        raise ValueError(
            f"model.snr_gamma {snr_gamma}: give a positive number (5 is the min-SNR paper's choice) or null for the "
            "plain MSE loss."
        )
    lora_dropout, num_inference_steps, lr_warmup_steps = (
        hp["lora_dropout"],
        hp["num_inference_steps"],
        hp["lr_warmup_steps"],
    )
    if not 0 <= lora_dropout < 1 or num_inference_steps < 1 or lr_warmup_steps < 0:
        raise ValueError(
            "model.lora_dropout must lie in [0, 1), model.num_inference_steps be 1 or more and "
            f"model.lr_warmup_steps 0 or more (given {lora_dropout}, {num_inference_steps}, {lr_warmup_steps})."
        )
    check_generation_settings(hp)
    prior_loss_weight = hp["prior_loss_weight"]
    if not (prior_loss_weight >= 0 and math.isfinite(prior_loss_weight)):  # `not >=` also catches NaN
        raise ValueError(
            f"model.prior_loss_weight {prior_loss_weight}: give 0 (off) or a positive number (1.0: a "
            "regularisation prompt counts as much as a photo), with the prompts in data.prior_prompts."
        )


def check_generation_settings(hp: Mapping[str, Any]) -> None:
    """``model.image_size`` and ``model.sampler`` failed only at the first image (after N training steps when the
    baseline validation is off), under diffusers' words; a negative prompt does nothing without guidance."""
    import diffusers

    size, sampler = hp["image_size"], hp["sampler"]
    if size is not None and not (size >= 8 and size % 8 == 0):
        raise ValueError(
            f"model.image_size {size}: give a positive multiple of 8 (SD1.5: 512), or null for the UNet's native size."
        )
    cls = getattr(diffusers, sampler, None) if sampler else diffusers.SchedulerMixin
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ValueError(
            f"model.sampler {sampler}: not a diffusers scheduler class. Give a name like DPMSolverMultistepScheduler "
            "or EulerAncestralDiscreteScheduler, or null for the base model's own."
        )
    if hp["negative_prompt"] and hp["guidance_scale"] <= 1:
        rank_zero_warn(
            f"model.negative_prompt is set, but model.guidance_scale is {hp['guidance_scale']}: without classifier-free "
            "guidance (a scale above 1) diffusers ignores negative prompts. Raise the scale (7.5) to use it."
        )


def load_base(hp: Mapping[str, Any]) -> BaseModel:
    """The base model of ``model.pretrained_model_name_or_path`` (``revision``, ``variant``, ``model_config``) in
    ``model.frozen_dtype``, predicting ``model.prediction_type`` when one is set."""
    # Loaded straight in the frozen dtype: SD1.5 never sits in memory twice.
    base = load_base_model(
        hp["pretrained_model_name_or_path"],
        hp["revision"],
        hp["variant"],
        torch_dtype=getattr(torch, hp["frozen_dtype"]),
        config=hp["model_config"],
    )
    prediction_type = hp["prediction_type"]
    if prediction_type is not None:
        # Training targets and sampling must agree on what the UNet predicts.
        base.noise_scheduler.register_to_config(prediction_type=prediction_type)
        base.sampler_config["prediction_type"] = prediction_type
    return base


def lora_config(hp: Mapping[str, Any], targets: list[str]) -> LoraConfig:
    """The peft adapter of ``model.lora_rank``, ``lora_alpha``, ``lora_dropout`` and ``lora_init`` on ``targets``."""
    return LoraConfig(
        r=hp["lora_rank"],
        lora_alpha=hp["lora_alpha"],
        lora_dropout=hp["lora_dropout"],
        init_lora_weights=hp["lora_init"],
        target_modules=list(targets),
    )


def add_lora_adapters(
    vae: AutoencoderKL, text_encoder: CLIPTextModel, unet: UNet2DConditionModel, hp: Mapping[str, Any]
) -> None:
    """Freeze the three models and add the LoRA adapters: to the UNet, and to the text encoder when it trains."""
    # Freeze everything visibly, then add the adapters: peft marks only LoRA tensors trainable.
    for frozen in (vae, text_encoder, unet):
        frozen.requires_grad_(False)
    vae.eval()
    unet.add_adapter(lora_config(hp, hp["unet_target_modules"] or UNET_TARGETS))
    if hp["train_text_encoder"]:
        text_encoder.add_adapter(lora_config(hp, hp["text_encoder_target_modules"] or TEXT_ENCODER_TARGETS))
    else:
        text_encoder.eval()
    # LoRA weights train in float32 whatever the frozen dtype: half-precision updates of small LoRA
    # weights underflow (diffusers' examples `cast_training_params`).
    for model in (vae, text_encoder, unet):
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()


def apply_speed_options(
    text_encoder: CLIPTextModel,
    unet: UNet2DConditionModel,
    hp: Mapping[str, Any],
    recompute_context: Callable[[], AbstractContextManager] = nullcontext,
) -> None:
    """``model.gradient_checkpointing`` (recomputing in ``recompute_context``, see
    :func:`~lightning_modules.mixed_precision.checkpoint_function`) and ``model.compile`` (with ``compile_mode``,
    ``compile_cache_dir``)."""
    if hp["gradient_checkpointing"]:
        checkpoint = checkpoint_function(recompute_context)
        unet.enable_gradient_checkpointing(checkpoint)
        if hp["train_text_encoder"]:
            # transformers checkpoints only in train mode; CLIP has no dropout, so nothing else changes.
            # transformers 5.23 renamed it (the old name warns); 4.x knows only the old one.
            enable = getattr(text_encoder, "activation_checkpointing_enable", None)
            enable = enable or text_encoder.gradient_checkpointing_enable
            enable(checkpoint.keywords)
            text_encoder.train()
    if hp["compile"]:
        # Regional compilation (diffusers' `compile_repeated_blocks`, PyTorch's regional compilation recipe):
        # the 16 transformer blocks share a handful of shapes, so compiling them costs a fraction of a
        # whole-UNet compile (150-190 s on an H100, issue #9) for most of the speed-up.
        compile_repeated_blocks(unet, hp["compile_mode"], hp["compile_cache_dir"])
