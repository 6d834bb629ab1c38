"""Stable Diffusion 1.x with a LoRA-wrapped UNet (and optionally text encoder), trained by DDPM noise prediction."""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
from diffusers.optimization import get_scheduler
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image

from lightning_modules.base_model import load_base_model
from lightning_modules.diffusion_loss import (
    DiffusionLoss,
    PriorPreservation,
    adapters_disabled,
    diffusion_loss_terms,
    face_loss_weights,
    sample_latents,
)
from lightning_modules.finite import check_finite
from lightning_modules.generation import BatchedGeneration
from lightning_modules.mixed_precision import fused_adam, lora_inputs_uncast, use_compile_cache

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
LRScheduler = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]


def adamw(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4)


@dataclass(frozen=True)
class PriorPrompts:
    """Regularisation prompts of prior preservation: their token ids and the base text encoder's view of them, on
    the model's device. The base view never changes, so it is computed once (:meth:`LoRADiffusion.use_prior_prompts`).
    """

    prompts: list[str]
    input_ids: torch.Tensor
    base_encoder_hidden_states: torch.Tensor


class LoRADiffusion(L.LightningModule):
    """Frozen VAE and text encoder, UNet (and optionally text encoder) with peft LoRA adapters.

    Args:
        pretrained_model_name_or_path: Hub id, local diffusers folder, or single ``.safetensors``/``.ckpt`` file.
        revision: Hub revision (branch, tag or commit).
        variant: weight file variant, e.g. ``fp16``.
        model_config: a local diffusers folder holding the configs and tokenizer, for a single-file checkpoint
            offline.
        frozen_dtype: dtype of the frozen weights. ``float16``/``bfloat16`` halve memory and need a
            ``*-mixed`` trainer precision; LoRA weights always stay float32.
        lora_rank: LoRA rank ``r``.
        lora_alpha: LoRA alpha; the update is scaled by ``alpha / r``.
        lora_dropout: dropout on the LoRA input.
        lora_init: peft ``init_lora_weights`` (``true``: Kaiming A, zero B; ``gaussian``; ``orthogonal``). Inits that
            change the base weights (PiSSA, OLoRA) are not offered: the exported LoRA files could not describe them.
        unet_target_modules: UNet modules to wrap (default attention projections ``to_q,to_k,to_v,to_out.0``).
        train_text_encoder: also wrap the text encoder with LoRA.
        text_encoder_target_modules: text-encoder modules to wrap (default ``q_proj,k_proj,v_proj,out_proj``).
        text_encoder_lr: learning rate of the text-encoder LoRA; default: the optimizer's.
        optimizer: optimizer factory, called with the trainable parameter groups (default AdamW, lr 1e-4).
        lr_scheduler: diffusers ``get_scheduler`` name, stepped every optimizer step.
        lr_warmup_steps: linear warmup steps.
        lr_num_cycles: cycles of ``cosine_with_restarts``.
        noise_offset: offset noise strength (0 = off).
        snr_gamma: min-SNR-gamma loss weighting (``None`` = plain MSE; 5 is the paper's choice).
        face_loss_weight: loss weight of the latent pixels on the face (the data module's face mask, issue #12);
            with ``background_loss_weight`` it sets how much more the face counts. Equal weights (the default):
            an even loss, and no face detection.
        background_loss_weight: loss weight of the pixels away from the face. Weights are scaled per image to
            average 1, so only their ratio matters: 1.0 / 0.3 makes a face pixel count 3.3 times a background one.
        prior_loss_weight: prior preservation without class images (issue #12); 0 = off. Each step draws one of
            the regularisation prompts (``data.prior_prompts``, e.g. "a photo of a man") per sample; for those the
            target is the base model's own prediction (all adapters off) on the same noisy latents, and the total
            loss is the photos' loss + ``prior_loss_weight`` × this prior loss: the LoRA learns the person without
            making every person look like them. Costs two more UNet passes a step (one without gradient).
        prediction_type: ``epsilon`` or ``v_prediction``; default: the base model scheduler's.
        num_inference_steps: sampler steps when generating (validation, test, predict; HW: 30).
        guidance_scale: classifier-free guidance scale when generating (diffusers' default 7.5).
        negative_prompt: negative prompt when generating.
        image_size: generated image side; default: the UNet's native size.
        sampler: diffusers scheduler class name for generating, e.g. ``DPMSolverMultistepScheduler``;
            default: the base model's own.
        generation_seed: image ``i`` of prompt ``p`` is generated with seed ``generation_seed + p`` (+ 1000 ``i``).
        compile: compile the UNet's repeated transformer blocks with ``torch.compile`` (regional compilation:
            seconds to compile instead of minutes for the whole UNet). Worth it on a GPU; off by default.
        compile_mode: ``torch.compile`` mode, e.g. ``reduce-overhead`` for CUDA graphs; default: torch's.
        compile_cache_dir: where compiled kernels and graphs are kept between runs, so a second run or a resume
            starts in seconds; default ``~/.cache/likeness/torch_compile``. ``TORCHINDUCTOR_CACHE_DIR`` set in
            the environment wins.
        gradient_checkpointing: recompute activations in the backward pass: less memory, slower steps.
    """

    def __init__(
        self,
        pretrained_model_name_or_path: str,
        revision: str | None = None,
        variant: str | None = None,
        model_config: str | None = None,
        frozen_dtype: Literal["float32", "float16", "bfloat16"] = "float32",
        lora_rank: int = 4,
        lora_alpha: float = 4.0,
        lora_dropout: float = 0.0,
        lora_init: bool | Literal["gaussian", "orthogonal"] = True,
        unet_target_modules: list[str] | None = None,
        train_text_encoder: bool = False,
        text_encoder_target_modules: list[str] | None = None,
        text_encoder_lr: float | None = None,
        optimizer: OptimizerCallable = adamw,
        lr_scheduler: LRScheduler = "constant",
        lr_warmup_steps: int = 0,
        lr_num_cycles: int = 1,
        noise_offset: float = 0.0,
        snr_gamma: float | None = None,
        face_loss_weight: float = 1.0,
        background_loss_weight: float = 1.0,
        prior_loss_weight: float = 0.0,
        prediction_type: Literal["epsilon", "v_prediction"] | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        negative_prompt: str = "",
        image_size: int | None = None,
        sampler: str | None = None,
        generation_seed: int = 0,
        compile: bool = False,
        compile_mode: str | None = None,
        compile_cache_dir: str | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        for setting, value in (
            ("lora_rank", lora_rank),
            ("lora_alpha", lora_alpha),
            ("text_encoder_lr", text_encoder_lr),
            ("face_loss_weight", face_loss_weight),
            ("background_loss_weight", background_loss_weight),
        ):
            if value is not None and not value > 0:  # `not >` also catches NaN
                raise ValueError(f"model.{setting} {value}: give a positive number.")
        if not 0 <= lora_dropout < 1 or num_inference_steps < 1 or lr_warmup_steps < 0:
            raise ValueError(
                "model.lora_dropout must lie in [0, 1), model.num_inference_steps be 1 or more and "
                f"model.lr_warmup_steps 0 or more (given {lora_dropout}, {num_inference_steps}, {lr_warmup_steps})."
            )
        if not (prior_loss_weight >= 0 and math.isfinite(prior_loss_weight)):  # `not >=` also catches NaN
            raise ValueError(
                f"model.prior_loss_weight {prior_loss_weight}: give 0 (off) or a positive number (1.0: a "
                "regularisation prompt counts as much as a photo), with the prompts in data.prior_prompts."
            )
        if callable(self.hparams.get("optimizer")):
            # Built in Python: a function cannot go into a weights_only checkpoint. (LightningCLI saves the
            # optimizer as its class_path dict, which stays.)
            self.remove_ignored_hparams(["optimizer"])
            self._hparams_initial.pop("optimizer", None)
        self.optimizer_factory = optimizer
        self.loaded_step = 0  # global step of the checkpoint loaded for validate/test/predict
        self._resumed_plan: int | None = None  # planned steps of the run a resumed checkpoint came from
        # Set before step 1 by the data module (data.prior_prompts), or by hand: use_prior_prompts.
        self.prior_prompts: PriorPrompts | None = None
        # Loaded straight in the frozen dtype: SD1.5 never sits in memory twice.
        base = load_base_model(
            pretrained_model_name_or_path,
            revision,
            variant,
            torch_dtype=getattr(torch, frozen_dtype),
            config=model_config,
        )
        self.base = base
        self.tokenizer = base.tokenizer
        self.noise_scheduler = base.noise_scheduler
        if prediction_type is not None:
            # Training targets and sampling must agree on what the UNet predicts.
            self.noise_scheduler.register_to_config(prediction_type=prediction_type)
            base.sampler_config["prediction_type"] = prediction_type
        self.vae, self.text_encoder, self.unet = base.vae, base.text_encoder, base.unet

        # Freeze everything visibly, then add the adapters: peft marks only LoRA tensors trainable.
        for frozen in (self.vae, self.text_encoder, self.unet):
            frozen.requires_grad_(False)
        self.vae.eval()
        self.unet.add_adapter(self._lora_config(unet_target_modules or UNET_TARGETS))
        if train_text_encoder:
            self.text_encoder.add_adapter(self._lora_config(text_encoder_target_modules or TEXT_ENCODER_TARGETS))
        else:
            self.text_encoder.eval()
        # LoRA weights train in float32 whatever the frozen dtype: half-precision updates of small LoRA
        # weights underflow (diffusers' examples `cast_training_params`).
        for param in self.trainable_parameters():
            param.data = param.data.float()
        self._lora_layers = [m for m in self.modules() if isinstance(m, BaseTunerLayer)]
        self.batched_generation = BatchedGeneration()
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if train_text_encoder:
                # transformers checkpoints only in train mode; CLIP has no dropout, so nothing else changes.
                self.text_encoder.gradient_checkpointing_enable()
                self.text_encoder.train()
        if compile:
            # Regional compilation (diffusers' `compile_repeated_blocks`, PyTorch's regional compilation recipe):
            # the 16 transformer blocks share a handful of shapes, so compiling them costs a fraction of a
            # whole-UNet compile (150-190 s on an H100, issue #9) for most of the speed-up.
            use_compile_cache(compile_cache_dir)
            self.unet.compile_repeated_blocks(mode=compile_mode)

    def _lora_config(self, targets: list[str]) -> LoraConfig:
        hp = self.hparams
        return LoraConfig(
            r=hp.lora_rank,
            lora_alpha=hp.lora_alpha,
            lora_dropout=hp.lora_dropout,
            init_lora_weights=hp.lora_init,
            target_modules=list(targets),
        )

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_names(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

    # --- training -------------------------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        trainable = sum(p.numel() for p in self.trainable_parameters())
        total = sum(p.numel() for p in self.parameters())
        rank_zero_info(f"Trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")

    def step_seed(self) -> int:
        """A seed that is a pure function of (run seed, batch number, rank): noise, timesteps and dropout of a
        batch are the same whether the run was resumed or not, whatever else consumed the global RNG."""
        batch_number = self.trainer.fit_loop.total_batch_idx if self._trainer is not None else 0
        base_seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        return (base_seed * 1_000_003 + batch_number * 101 + self.global_rank) % 2**63

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        terms = self.loss_terms(batch)
        batch_size = batch["input_ids"].shape[0]
        self.log("train/loss", terms.loss, prog_bar=True, batch_size=batch_size)
        if terms.prior_loss is not None:
            # train/loss is what trains (the total); the photos' part alone stays comparable with runs without it.
            self.log("train/identity_loss", terms.identity_loss.detach(), batch_size=batch_size)
            self.log("train/prior_loss", terms.prior_loss.detach(), batch_size=batch_size)
        return terms.loss

    def loss_terms(self, batch: dict[str, Any]) -> DiffusionLoss:
        """The training loss of ``batch`` and its parts, drawn from the step's own seed (:meth:`step_seed`)."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self._lora_inputs_under_autocast():
            torch.manual_seed(self.step_seed())
            latents = self.batch_latents(batch)
            return diffusion_loss_terms(
                self.unet,
                self.noise_scheduler,
                latents,
                self.batch_text_embeddings(batch),
                noise_offset=self.hparams.noise_offset,
                snr_gamma=self.hparams.snr_gamma,
                loss_weight=self.batch_loss_weight(batch, latents),
                prior=self.batch_prior(latents.shape[0]),
            )

    def batch_latents(self, batch: dict[str, Any]) -> torch.Tensor:
        """Scaled latents of a batch: drawn from the cached latent moments, or from encoding the pixels now."""
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"], batch["latent_std"]
        else:
            mean, std = self.latent_moments(batch["pixel_values"])
        return sample_latents(mean, std, self.vae.config.scaling_factor)

    @property
    def face_loss_weighted(self) -> bool:
        """The loss weighs face and background differently: the data module must serve ``face_mask``."""
        return self.hparams.face_loss_weight != self.hparams.background_loss_weight

    @property
    def latent_scale_factor(self) -> int:
        """Training pixels per latent pixel: the VAE halves the size once per block after the first."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def batch_loss_weight(self, batch: dict[str, Any], latents: torch.Tensor) -> torch.Tensor | None:
        """Per-pixel loss weights (B, 1, h, w) from the batch's ``face_mask``; ``None`` for an even loss."""
        if not self.face_loss_weighted:
            return None
        if "face_mask" not in batch:
            raise ValueError(
                "model.face_loss_weight differs from model.background_loss_weight, but the batch has no face_mask: "
                "train with FaceDataModule (it serves the mask), or set both weights equal."
            )
        mask = batch["face_mask"].float()
        if mask.shape[-2:] != latents.shape[-2:]:
            mask = torch.nn.functional.interpolate(mask, size=latents.shape[-2:], mode="bilinear")
        return face_loss_weights(mask, self.hparams.face_loss_weight, self.hparams.background_loss_weight)

    @property
    def prior_preservation(self) -> bool:
        """Prior preservation is on: the data module must hand over the regularisation prompts."""
        return self.hparams.prior_loss_weight > 0

    def use_prior_prompts(self, prompts: list[str]) -> None:
        """Train prior preservation with these regularisation prompts: tokenized, and the base text encoder's view
        of them (its LoRA off, if it has one) computed once now, on the model's device."""
        if not prompts:
            raise ValueError(
                f"model.prior_loss_weight {self.hparams.prior_loss_weight} needs regularisation prompts: set "
                "data.prior_prompts to a file or a list (e.g. '[a photo of a man]'), or model.prior_loss_weight to 0."
            )
        input_ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        # The trained text encoder's LoRA must not colour the target: it is the base model's own view of the prompt.
        base_view = nullcontext() if self.text_encoder_frozen else adapters_disabled(self.text_encoder)
        with base_view:
            base = self.encode_prompts(input_ids).float()
        self.prior_prompts = PriorPrompts(list(prompts), input_ids, base)

    def batch_prior(self, batch_size: int) -> PriorPreservation | None:
        """One regularisation prompt per sample, drawn from the global RNG (the step's seed: a resume draws the
        same); ``None`` without prior preservation (then nothing is drawn)."""
        if not self.prior_preservation:
            return None
        prior = self.prior_prompts
        if prior is None:
            raise ValueError(
                f"model.prior_loss_weight {self.hparams.prior_loss_weight} needs regularisation prompts: set "
                "data.prior_prompts (FaceDataModule hands them to the model before step 1), or call "
                "use_prior_prompts(prompts) when training without it; or set model.prior_loss_weight to 0."
            )
        drawn = torch.randint(len(prior.prompts), (batch_size,)).to(prior.input_ids.device)
        input_ids = prior.input_ids[drawn].to(self.device)
        base = prior.base_encoder_hidden_states[drawn].to(self.device)
        # A frozen text encoder is the base one; a trained one's LoRA view is computed now, with gradient.
        hidden = base if self.text_encoder_frozen else self.text_encoder(input_ids, return_dict=False)[0]
        return PriorPreservation(self.hparams.prior_loss_weight, hidden, base)

    def batch_text_embeddings(self, batch: dict[str, Any]) -> torch.Tensor:
        """The text encoder's hidden states: cached ones when the text encoder is frozen, else computed now."""
        if "encoder_hidden_states" in batch:
            if self.hparams.train_text_encoder:
                raise ValueError("Cached text embeddings cannot train a text-encoder LoRA: serve input_ids.")
            return batch["encoder_hidden_states"]
        return self.text_encoder(batch["input_ids"], return_dict=False)[0]

    @property
    def text_encoder_frozen(self) -> bool:
        """The text encoder does not train: its outputs per caption never change and can be cached."""
        return not self.hparams.train_text_encoder

    def _forward_context(self):
        # The trainer's precision (autocast for *-mixed): cached encodings must be computed as live ones are.
        return self.trainer.precision_plugin.forward_context() if self._trainer is not None else nullcontext()

    @torch.no_grad()
    def latent_moments(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of the VAE's latent distribution of images in [-1, 1], float32."""
        with self._forward_context():
            dist = self.vae.encode(pixel_values.to(self.device, self.vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    @torch.no_grad()
    def encode_prompts(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The (frozen) text encoder's last hidden states for token ids, as the training step computes them."""
        with self._forward_context():
            return self.text_encoder(input_ids.to(self.device), return_dict=False)[0]

    def _lora_inputs_under_autocast(self):
        return lora_inputs_uncast(self._lora_layers, self.device.type)

    def param_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters only, one group per model (the text encoder may have its own lr)."""
        groups: list[dict[str, Any]] = [
            {"params": [p for p in self.unet.parameters() if p.requires_grad], "name": "unet"}
        ]
        if self.hparams.train_text_encoder:
            te_group = {"params": [p for p in self.text_encoder.parameters() if p.requires_grad], "name": "te"}
            if self.hparams.text_encoder_lr is not None:
                te_group["lr"] = self.hparams.text_encoder_lr
            groups.append(te_group)
        return groups

    def on_train_start(self) -> None:
        # A resume restores the optimizer and scheduler with the checkpoint's learning rates; the config wins
        # (see train.py), so put the configured base LRs back and recompute the LR at the resumed step.
        if self.global_step == 0:
            return
        configured = [g["lr"] for g in self.optimizer_factory(self.param_groups()).param_groups]
        scheduler = self.lr_schedulers()
        for i, (group, lr) in enumerate(zip(self.optimizers().optimizer.param_groups, configured, strict=True)):
            group["initial_lr"] = scheduler.base_lrs[i] = lr
            group["lr"] = lr * scheduler.lr_lambdas[i](scheduler.last_epoch)
        planned, total = self._resumed_plan, int(self.trainer.estimated_stepping_batches)
        if planned and planned != total and self.hparams.lr_scheduler != "constant":
            # The schedule is a function of the run's length: extending a run stretches it (issue #8). Say so.
            step, lr = scheduler.last_epoch, configured[0]
            rank_zero_warn(
                f"This run trains {total} steps; the checkpoint's run planned {planned}. The {self.hparams.lr_scheduler}"
                f" learning-rate schedule now spans {total} steps: at step {step} the learning rate is "
                f"{lr * self._schedule(total)(step):.3g} (the old plan had {lr * self._schedule(planned)(step):.3g})."
            )

    def _schedule(self, total_steps: int, optimizer: torch.optim.Optimizer | None = None):
        """diffusers' schedule for a run of ``total_steps``: the scheduler, or its LR factor by step without one."""
        probe = optimizer or torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        scheduler = get_scheduler(
            self.hparams.lr_scheduler,
            optimizer=probe,
            num_warmup_steps=self.hparams.lr_warmup_steps,
            num_training_steps=total_steps,
            num_cycles=self.hparams.lr_num_cycles,
        )
        return scheduler if optimizer is not None else scheduler.lr_lambdas[0]

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = fused_adam(self.optimizer_factory(self.param_groups()))
        scheduler = self._schedule(int(self.trainer.estimated_stepping_batches), optimizer)
        # "train/lr": LearningRateMonitor logs train/lr/unet and train/lr/te, beside the loss in TensorBoard.
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"},
        }

    # --- small checkpoints ----------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Only the LoRA tensors: the frozen base model is reloaded from `pretrained_model_name_or_path`.
        keep = self.trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        # The run's seed drives data order and per-step noise: a resume must use it even if the config
        # asked for a random seed (`seed_everything: true`).
        checkpoint["seed"] = int(os.environ.get("PL_GLOBAL_SEED", 0))
        if self._trainer is not None:  # the run's planned length, which shapes the LR schedule
            checkpoint["planned_steps"] = int(self.trainer.estimated_stepping_batches)
        checkpoint["rng_states"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        missing = sorted(self.trainable_names() - set(checkpoint.get("state_dict", {})))
        if missing:
            shown = "\n  ".join(missing[:10]) + (f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise KeyError(
                f"The checkpoint lacks {len(missing)} trainable LoRA tensor(s) of this model:\n  {shown}\n"
                "It was probably trained with other LoRA settings (rank, target modules, train_text_encoder): "
                "use the config it was trained with."
            )
        check_finite(
            checkpoint["state_dict"],
            "The checkpoint",
            "Its LoRA weights are unusable (a diverged run, or a damaged file): use an earlier checkpoint.",
        )
        # The frozen weights come from the base model just loaded: complete the state dict with them, so that
        # Lightning's strict load checks every other key.
        checkpoint["state_dict"] = {**self.state_dict(), **checkpoint["state_dict"]}
        if "seed" in checkpoint:
            os.environ["PL_GLOBAL_SEED"] = str(checkpoint["seed"])
        self.loaded_step = int(checkpoint.get("global_step", 0))
        self._resumed_plan = checkpoint.get("planned_steps")
        states = checkpoint.get("rng_states", {})
        if "torch" in states:
            torch.set_rng_state(states["torch"])
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])

    # --- generation (validation, test, predict) -------------------------------------------------------------

    def seeds_for(self, batch: dict[str, Any]) -> list[int]:
        repeats = batch.get("repeat", torch.zeros_like(batch["index"]))
        return [
            self.hparams.generation_seed + int(i) + 1000 * int(r) for i, r in zip(batch["index"], repeats, strict=True)
        ]

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        """One image per prompt with the in-memory (LoRA) UNet and text encoder; seed ``seeds[i]`` for image i."""
        hp = self.hparams
        pipeline = self.base.pipeline(unet=self.unet, text_encoder=self.text_encoder, sampler=hp.sampler)
        # A bar over the denoising steps where the run shows progress (the CLI, not the tests).
        trainer = self._trainer
        bar = trainer is not None and trainer.progress_bar_callback is not None and not trainer.sanity_checking
        pipeline.set_progress_bar_config(disable=not bar, leave=False, desc=f"generating {len(prompts)} images")
        size = hp.image_size or self.unet.config.sample_size * pipeline.vae_scale_factor
        return self.batched_generation(
            pipeline,
            prompts,
            seeds,
            negative_prompt=hp.negative_prompt,
            num_inference_steps=hp.num_inference_steps,
            guidance_scale=hp.guidance_scale,
            height=size,
            width=size,
        )

    def generate_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        seeds = self.seeds_for(batch)
        prompts = list(batch["prompt"])
        return {"images": self.generate(prompts, seeds), "prompts": prompts, "seeds": seeds}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return self.generate_batch(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return self.generate_batch(batch)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return self.generate_batch(batch)
