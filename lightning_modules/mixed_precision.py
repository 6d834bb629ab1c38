"""Speed without waste: LoRA inputs not cast twice under autocast, Adam's fused kernel on CUDA, the UNet's repeated
blocks compiled once and kept between runs (issue #9)."""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint
from peft.tuners.tuners_utils import BaseTunerLayer


@contextmanager
def lora_inputs_uncast(lora_layers: list[BaseTunerLayer], device_type: str) -> Iterator[None]:
    """Under autocast, keep peft from casting every LoRA layer's input to the float32 LoRA weights' dtype.

    peft casts x to float32 before ``lora_A``, and autocast casts it straight back to bfloat16 for the matmul: two
    activation-sized copies per LoRA layer forward and two more backward, most of the ~2,400 copy kernels per step
    that issue #9's profile found. The result is bit-identical (bf16 -> fp32 -> bf16 is exact). The LoRA weights
    themselves stay float32 master weights, which AdamW updates without bf16 underflow (keeping them in bf16, as
    diffusers' example does, loses small updates); autocast casts each once per forward (its weight cache), a few
    hundred tiny copies. Outside autocast (generation with bf16 frozen weights) peft's cast is needed and stays on.
    """
    if not torch.is_autocast_enabled(device_type):
        yield
        return
    before = [layer.cast_input_dtype_enabled for layer in lora_layers]  # nested (recomputation inside a step)
    for layer in lora_layers:
        layer.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for layer, enabled in zip(lora_layers, before, strict=True):
            layer.cast_input_dtype_enabled = enabled


def checkpoint_function(recompute_context: Callable[[], AbstractContextManager]) -> Callable[..., Any]:
    """``torch.utils.checkpoint`` as diffusers and transformers call it, its recomputation in ``recompute_context``.

    The backward pass recomputes a checkpointed block outside the training step, so outside
    :func:`lora_inputs_uncast`: without this, peft's input casts come back there (52 more copy kernels per step
    on the tiny model) and a compiled block sees another flag than its graph was traced with, and recompiles.
    Checkpoint restores the forward's autocast state before it enters ``recompute_context``.
    """
    return functools.partial(
        torch.utils.checkpoint.checkpoint, use_reentrant=False, context_fn=lambda: (nullcontext(), recompute_context())
    )


def fused_adam(optimizer: torch.optim.Optimizer, devices: tuple[str, ...] = ("cuda",)) -> torch.optim.Optimizer:
    """Adam/AdamW rebuilt with torch's fused kernel (one launch updates every LoRA tensor) when all parameters are
    on ``devices`` and the config chose no implementation (``fused``/``foreach``); any other optimizer as it is."""
    defaults = optimizer.defaults
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW) or defaults.get("differentiable"):
        return optimizer
    if defaults.get("fused") is not None or defaults.get("foreach") is not None:
        return optimizer
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not params or any(p.device.type not in devices or not p.dtype.is_floating_point for p in params):
        return optimizer
    accepted = inspect.signature(type(optimizer)).parameters  # AdamW's defaults hold more than it takes
    groups = [{**group, "fused": True} for group in optimizer.param_groups]
    return type(optimizer)(groups, **{k: v for k, v in defaults.items() if k in accepted} | {"fused": True})


def use_compile_cache(folder: str | os.PathLike | None = None) -> None:
    """Keep torch.compile's caches (Inductor's FX-graph and AOTAutograd caches, Triton kernels) in ``folder``.

    Inductor caches by default in ``/tmp/torchinductor_<user>``, which Colab, containers and many clusters empty
    between sessions: every run would compile again. A folder under the user's cache makes the second run and
    every resume reuse what the first compiled. A ``TORCHINDUCTOR_CACHE_DIR`` the user set wins. Inductor reads the
    variable when it compiles (the first forward), so setting it before then is enough.
    """
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return
    from datamodules.files import default_cache_dir

    root = Path(folder).expanduser() if folder is not None else default_cache_dir() / "torch_compile"
    root.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root)
    os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton"))


# Graphs that the compiled transformer blocks need, all sharing one code object: parameters keep static shapes, so
# each channel width (SD1.5: 320, 640, 1280) is its own graph, once with gradient (training) and once without
# (generation), plus the first block's input that needs no gradient, plus the 1x1 latents of small images, whose
# strides differ. SD1.5 at 64 px took 14 graphs (counted on the CPU: training batches of 2 and 1 with a text-encoder
# LoRA, then generation), the tiny demo model 8.
# Past dynamo's default limit of 8 per code object the rest would run uncompiled, with one warning among many.
BLOCK_RECOMPILE_LIMIT = 32


def compile_repeated_blocks(unet: torch.nn.Module, mode: str | None = None, cache_dir: str | None = None) -> None:
    """Compile the UNet's repeated transformer blocks in place with ``torch.compile`` ``mode``, the kernels kept in
    ``cache_dir`` (:func:`use_compile_cache`), and enough graphs allowed for training and generation alike."""
    use_compile_cache(cache_dir)
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    setattr(config, name, max(getattr(config, name), BLOCK_RECOMPILE_LIMIT))
    unet.compile_repeated_blocks(mode=mode)
