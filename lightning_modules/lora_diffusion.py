"""Stable Diffusion 1.x with a LoRA-wrapped UNet (and optionally text encoder), trained by DDPM noise prediction."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_info
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image

from callbacks.cpu_heap_reuse import CPUHeapReuse
from lightning_modules import training_batch
from lightning_modules.diffusion_loss import DiffusionLoss, PriorPreservation, diffusion_loss_terms
from lightning_modules.generation import BatchedGeneration
from lightning_modules.lora_checkpoint import load_lora_only, save_lora_only
from lightning_modules.lora_generation import generate_images, generation_seeds
from lightning_modules.lora_optimization import LoraOptimization, LRScheduler, captures_cuda_graphs, zero_grad
from lightning_modules.lora_setup import add_lora_adapters, apply_speed_options, check_settings, load_base
from lightning_modules.mixed_precision import lora_inputs_uncast
from lightning_modules.parked_encoder import ParkedEncoder
from lightning_modules.prior_prompts import PriorPrompts
from lightning_modules.step_mean import StepMean


def adamw(params) -> torch.optim.Optimizer:
    # Stays here: a run's saved config.yaml names the default optimizer `lightning_modules.lora_diffusion.adamw`.
    return torch.optim.AdamW(params, lr=1e-4)


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
        check_settings(self.hparams)
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
        self.base = base = load_base(self.hparams)
        self.tokenizer = base.tokenizer
        self.noise_scheduler = base.noise_scheduler
        self.vae, self.text_encoder, self.unet = base.vae, base.text_encoder, base.unet

        add_lora_adapters(self.vae, self.text_encoder, self.unet, self.hparams)
        self._lora_layers = [m for m in self.modules() if isinstance(m, BaseTunerLayer)]
        self.batched_generation = BatchedGeneration()
        self._step_mean = StepMean()  # train/* logged as the mean over the micro-batches of an optimizer step
        self.parked_encoder = ParkedEncoder(self.vae)
        apply_speed_options(self.text_encoder, self.unet, self.hparams, self._lora_inputs_under_autocast)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_names(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def configure_callbacks(self) -> list[L.Callback]:
        # Part of the training path wherever a Trainer runs this module (train.py, the benchmark, a notebook).
        return [CPUHeapReuse()]

    # --- training -------------------------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        trainable = sum(p.numel() for p in self.trainable_parameters())
        total = sum(p.numel() for p in self.parameters())
        rank_zero_info(f"Trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")

    def step_seed(self) -> int:
        """The batch's own seed (:func:`~lightning_modules.training_batch.step_seed`): resumes draw the same."""
        batch_number = self.trainer.fit_loop.total_batch_idx if self._trainer is not None else 0
        return training_batch.step_seed(batch_number, self.global_rank)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        terms = self.loss_terms(batch)
        batch_size = batch["input_ids"].shape[0]
        parts = {"train/loss": terms.loss}
        if terms.prior_loss is not None:
            # train/loss is what trains (the total); the photos' part alone stays comparable with runs without it.
            parts |= {"train/identity_loss": terms.identity_loss, "train/prior_loss": terms.prior_loss}
        # Not prog_bar: Lightning turns progress-bar metrics into numbers after every step, a wait for the GPU each
        # (issue #9); StepProgressBar reads the loss from the step's output when it redraws.
        for name, mean in self._step_mean.update(self.global_step, **parts).items():
            self.log(name, mean, batch_size=batch_size)
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
        return training_batch.batch_latents(batch, self.latent_moments, self.vae.config.scaling_factor)

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
        return training_batch.face_mask_weights(
            batch, latents, self.hparams.face_loss_weight, self.hparams.background_loss_weight
        )

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
        self.prior_prompts = PriorPrompts.encode(
            prompts, self.tokenizer, self.encode_prompts, self.trained_text_encoder, self.device
        )

    def batch_prior(self, batch_size: int) -> PriorPreservation | None:
        """One regularisation prompt per sample (:meth:`PriorPrompts.draw`); ``None`` without prior preservation
        (then nothing is drawn)."""
        if not self.prior_preservation:
            return None
        if self.prior_prompts is None:
            raise ValueError(
                f"model.prior_loss_weight {self.hparams.prior_loss_weight} needs regularisation prompts: set "
                "data.prior_prompts (FaceDataModule hands them to the model before step 1), or call "
                "use_prior_prompts(prompts) when training without it; or set model.prior_loss_weight to 0."
            )
        return self.prior_prompts.draw(
            batch_size, self.hparams.prior_loss_weight, self.trained_text_encoder, self.device
        )

    def batch_text_embeddings(self, batch: dict[str, Any]) -> torch.Tensor:
        """The text encoder's hidden states: cached ones when the text encoder is frozen, else computed now."""
        return training_batch.batch_text_embeddings(batch, self.text_encoder, self.hparams.train_text_encoder)

    @property
    def text_encoder_frozen(self) -> bool:
        """The text encoder does not train: its outputs per caption never change and can be cached."""
        return not self.hparams.train_text_encoder

    @property
    def trained_text_encoder(self) -> torch.nn.Module | None:
        """The text encoder when it trains a LoRA, else ``None``."""
        return None if self.text_encoder_frozen else self.text_encoder

    @property
    def encoding_precision(self) -> str:
        """The trainer's precision, which cached encodings are computed under (:meth:`_forward_context`)."""
        return str(self.trainer.precision) if self._trainer is not None else "32-true"

    def _forward_context(self):
        # The trainer's precision (autocast for *-mixed): cached encodings must be computed as live ones are.
        return self.trainer.precision_plugin.forward_context() if self._trainer is not None else nullcontext()

    def park_vae_encoder(self) -> bool:
        """Every training latent is cached: the VAE encoder waits on the CPU until it encodes again or the fit
        ends (:class:`~lightning_modules.parked_encoder.ParkedEncoder`). ``False``: it was on the CPU already."""
        return self.parked_encoder.park()

    def on_train_end(self) -> None:
        self.parked_encoder.unpark(self.device)

    @torch.no_grad()
    def latent_moments(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of the VAE's latent distribution of images in [-1, 1], float32."""
        self.parked_encoder.unpark(self.device)
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

    @property
    def optimization(self) -> LoraOptimization:
        hp = self.hparams
        return LoraOptimization(
            self.optimizer_factory, hp.lr_scheduler, hp.lr_warmup_steps, hp.lr_num_cycles, hp.text_encoder_lr
        )

    def param_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters only, one group per model (the text encoder may have its own lr)."""
        return self.optimization.param_groups(self.unet, self.trained_text_encoder)

    def on_train_start(self) -> None:
        # A resume restores the optimizer and scheduler with the checkpoint's learning rates; the config wins
        # (see train.py), so put the configured base LRs back and recompute the LR at the resumed step.
        if self.global_step == 0:
            return
        optimizer, scheduler = self.optimizers().optimizer, self.lr_schedulers()
        total = int(self.trainer.estimated_stepping_batches)
        self.optimization.restore_configured_lrs(self.param_groups(), optimizer, scheduler, self._resumed_plan, total)

    @property
    def keeps_grad_buffers(self) -> bool:
        """Gradients accumulate through CUDA graphs: they need buffers of their own (:func:`zero_grad`)."""
        hp, trainer = self.hparams, self._trainer
        accumulate = trainer.accumulate_grad_batches if trainer is not None else 1
        return hp.compile and captures_cuda_graphs(hp.compile_mode, self.device) and accumulate > 1

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        zero_grad(optimizer, self.trainable_parameters(), self.keeps_grad_buffers)

    def configure_optimizers(self) -> dict[str, Any]:
        # A fused Adam unscales gradients inside its step, so Lightning's mixed precision refuses to clip them
        # (RuntimeError at the first step): with trainer.gradient_clip_val there the optimizer stays unfused.
        clipped = (self.trainer.gradient_clip_val or 0) > 0
        fuse = not (clipped and isinstance(self.trainer.precision_plugin, MixedPrecision))
        return self.optimization.configure(self.param_groups(), int(self.trainer.estimated_stepping_batches), fuse)

    # --- small checkpoints ----------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        planned = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else None
        save_lora_only(checkpoint, self.trainable_names(), planned)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        load_lora_only(checkpoint, self.trainable_names(), self)
        self.loaded_step = int(checkpoint.get("global_step", 0))
        self._resumed_plan = checkpoint.get("planned_steps")

    # --- generation (validation, test, predict) -------------------------------------------------------------

    def seeds_for(self, batch: dict[str, Any]) -> list[int]:
        return generation_seeds(batch, self.hparams.generation_seed)

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        """One image per prompt with the in-memory (LoRA) UNet and text encoder; seed ``seeds[i]`` for image i."""
        # A bar over the denoising steps where the run shows progress (the CLI, not the tests).
        trainer = self._trainer
        bar = trainer is not None and trainer.progress_bar_callback is not None and not trainer.sanity_checking
        # Lightning enters the precision context only around *_step; validation during fit calls this from a
        # callback, which would generate in float32 (twice as slow on a GPU, other pixels than `likeness test`).
        with self.parked_encoder.home(self.device), self._forward_context(), self._lora_inputs_under_autocast():
            return generate_images(
                self.base, self.unet, self.text_encoder, self.batched_generation, self.hparams, prompts, seeds, bar
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
