"""likeness's side of ``train_speed.py``: LoRADiffusion + FaceDataModule + a Lightning Trainer, as ``train.py fit``
runs them, and the validation's generation timed on its own."""

from __future__ import annotations

import argparse
import contextlib
import inspect
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from speed_settings import LR, PROMPTS, SETTINGS, SNR_GAMMA, StepClock, sync


def accepted(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The kwargs that ``cls.__init__`` takes; prints a note naming the others."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    dropped = sorted(set(kwargs) - set(params))
    if dropped:
        print(f"note: {cls.__name__} does not accept {dropped}; dropped", flush=True)
    return {k: v for k, v in kwargs.items() if k in params}


class PromptValidation(L.Callback):
    """Stand-in for IdentityValidation: generate the first prompts every ``every`` steps, in eval mode."""

    def __init__(self, every: int, prompts: list[str]) -> None:
        self.every, self.prompts, self.seconds, self.runs = every, prompts, 0.0, 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        if trainer.global_step % self.every:
            return
        modes = {module: module.training for module in pl_module.modules()}
        sync(pl_module.device)  # the steps queued before it are training time, not the validation's
        start = time.perf_counter()
        pl_module.eval()
        try:
            pl_module.generate(self.prompts, list(range(len(self.prompts))))
        finally:
            for module, training in modes.items():
                module.train(training)
        self.seconds += time.perf_counter() - start
        self.runs += 1


def likeness_model_kwargs(args: argparse.Namespace, name: str, model_dir: Path) -> dict[str, Any]:
    """LoRADiffusion's settings for a benchmark setting, with the ``--likeness-option model.X=`` ones applied."""
    s = SETTINGS[name]
    model_kw: dict[str, Any] = {
        "pretrained_model_name_or_path": str(model_dir),
        "frozen_dtype": "bfloat16" if args.precision == "bf16-mixed" else "float32",
        "lora_rank": s.rank,
        "lora_alpha": s.alpha,
        "train_text_encoder": s.text_encoder,
        "snr_gamma": SNR_GAMMA,
        **({"text_encoder_lr": LR} if s.text_encoder else {}),
    }
    for key, value in args.likeness_option:
        if key.startswith("model."):
            model_kw[key.split(".", 1)[1]] = value
    return model_kw


def run_likeness(
    args: argparse.Namespace,
    name: str,
    model_dir: Path,
    photos: Path,
    run_dir: Path,
    max_steps: int,
    callbacks: list[L.Callback] | None = None,
    model_extra: dict[str, Any] | None = None,
    synced_steps: int | None = None,
) -> dict[str, Any]:
    """likeness as ``train.py fit`` runs it: LoRADiffusion + FaceDataModule + a Lightning Trainer. The first
    ``synced_steps`` steps (default: warm-up and timed) wait for the GPU at start and end (:class:`StepClock`)."""
    from datamodules.face_data_module import FaceDataModule
    from lightning_modules.lora_diffusion import LoRADiffusion

    s = SETTINGS[name]
    model_kw = likeness_model_kwargs(args, name, model_dir) | (model_extra or {})
    data_kw: dict[str, Any] = {"data_dir": str(photos), "resolution": args.resolution, "batch_size": s.batch}
    if "cache_dir" in inspect.signature(FaceDataModule.__init__).parameters:
        data_kw["cache_dir"] = str(run_dir / "cache")  # a fresh cache per run: its cost shows in "first step s"
    for key, value in args.likeness_option:
        if key.startswith("data."):
            data_kw[key.split(".", 1)[1]] = value
    L.seed_everything(args.seed, verbose=False)
    start = time.perf_counter()
    module = LoRADiffusion(**accepted(LoRADiffusion, model_kw))
    data = FaceDataModule(**accepted(FaceDataModule, data_kw))
    load_s = time.perf_counter() - start
    synced = args.warmup + args.steps if synced_steps is None else synced_steps
    clock = StepClock(torch.device(args.device), synced_steps=synced)
    trainer = L.Trainer(
        accelerator=args.device,
        devices=1,
        precision=args.precision,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,  # as train.py: FaceDataModule's sampler shards by rank itself
        default_root_dir=str(run_dir),
        callbacks=[clock, *(callbacks or [])],
    )
    clock.origin = time.perf_counter()
    trainer.fit(module, datamodule=data)
    total_s = time.perf_counter() - clock.origin
    hparams = {"model": dict(module.hparams), "data": dict(data.hparams)}
    hparams["model"].pop("optimizer", None)
    return clock.summary(args, name, "likeness", s.batch, load_s=load_s, total_s=total_s, hparams=hparams)


def time_generation(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    """The HW setting's model generating all 25 prompts at ``--generation-steps`` sampler steps and ``--resolution``,
    as a validation does (one call; fewer at a time only if memory runs out), twice: the first call warms up
    (cuDNN's algorithm search, compiling), the second is the figure."""
    from callbacks.cpu_heap_reuse import cpu_heap_reuse
    from lightning_modules.lora_diffusion import LoRADiffusion

    settings = {"num_inference_steps": args.generation_steps, "image_size": args.resolution}
    model_kw = likeness_model_kwargs(args, "hw", model_dir) | settings
    module = LoRADiffusion(**accepted(LoRADiffusion, model_kw)).to(args.device).eval()
    device, seeds, seconds = torch.device(args.device), list(range(len(PROMPTS))), []
    # As a validation inside a fit runs: under the trainer's autocast, and on a CPU with LoRADiffusion's callback.
    with cpu_heap_reuse(device.type == "cpu"), precision_context(args):
        for _ in range(2):
            sync(device)
            start = time.perf_counter()
            images = module.generate(PROMPTS, seeds)
            sync(device)
            seconds.append(time.perf_counter() - start)
    return {
        "prompts": len(images),
        "steps": args.generation_steps,
        "resolution": args.resolution,
        "first_call_s": seconds[0],
        "seconds": seconds[1],
        "images_per_call": module.batched_generation.max_batch or len(PROMPTS),
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None,
    }


def precision_context(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """The autocast that a Trainer of ``--precision`` runs its steps and validations under (Lightning's own)."""
    if not args.precision.endswith("-mixed"):
        return contextlib.nullcontext()
    from lightning.pytorch.plugins.precision import MixedPrecision

    return MixedPrecision(args.precision, args.device).forward_context()
