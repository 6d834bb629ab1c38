"""model.compile: training, then validation, then training again must not compile anything new (issue #9)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from lightning_modules.lora_diffusion import LoRADiffusion
from lightning_modules.mixed_precision import BLOCK_RECOMPILE_LIMIT


def _batch(model: LoRADiffusion, size: int) -> dict[str, torch.Tensor]:
    tokenizer = model.tokenizer
    ids = tokenizer(
        ["a photo of sks person"] * size,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    pixels = torch.rand(size, 3, 32, 32, generator=torch.Generator().manual_seed(size)) * 2 - 1
    return {"pixel_values": pixels, "input_ids": ids}


def count_compiles(monkeypatch, tmp_path) -> CompileCounter:
    """``torch.compile`` with a backend that counts the graphs dynamo hands it and runs them as they are."""
    counter = CompileCounter()
    real_compile = torch.compile

    def counted_compile(model, **kwargs):
        kwargs.pop("mode", None)  # a mode is for Inductor; the counter takes none
        return real_compile(model, backend=counter, **kwargs)

    monkeypatch.setattr(torch, "compile", counted_compile)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    return counter


@pytest.mark.slow
def test_validation_between_steps_compiles_nothing_new(tiny_sd, monkeypatch, tmp_path):
    counter = count_compiles(monkeypatch, tmp_path)
    # The tiny UNet needs 8 graphs here, exactly torch's default limit, where SD1.5 needs 14 (mixed_precision.py):
    # a limit of 4 stands for a default too low, which compiling must raise. A silent fallback to eager fails.
    # (config.patch puts torch's settings back afterwards.)
    with torch._dynamo.config.patch(recompile_limit=4, fail_on_recompile_limit_hit=True):
        torch._dynamo.reset()
        model = LoRADiffusion(str(tiny_sd), compile=True, num_inference_steps=2, train_text_encoder=True)
        assert torch._dynamo.config.recompile_limit >= BLOCK_RECOMPILE_LIMIT

        def train_validate_train() -> None:
            model.train()
            model.training_step(_batch(model, 2), 0).backward()
            model.eval()  # as the validation callback: three prompts (six UNet rows with guidance), no gradient
            model.generate(["a photo of sks person", "sks person on the moon", "a red car"], [0, 1, 2])
            model.train()
            model.training_step(_batch(model, 1), 0).backward()  # the epoch's last, smaller batch

        try:
            train_validate_train()
            first = counter.frame_count
            # Both the training (gradient) and the generation (no gradient) graphs were compiled...
            assert first >= 2
            # ...and the second round, as every later validation, finds them all: any recompile raises here.
            with torch._dynamo.config.patch(error_on_recompile=True):
                train_validate_train()
            assert counter.frame_count == first < BLOCK_RECOMPILE_LIMIT
        finally:
            torch._dynamo.reset()


@pytest.mark.slow
def test_checkpointed_blocks_recompute_with_their_compiled_graphs(tiny_sd, monkeypatch, tmp_path):
    """Gradient checkpointing + compile under bf16 autocast: the backward pass recomputes each compiled block in
    the state its forward traced (peft's input casts off), so it compiles no second graph per block."""
    counter = count_compiles(monkeypatch, tmp_path)
    torch._dynamo.reset()
    try:
        model = LoRADiffusion(str(tiny_sd), compile=True, gradient_checkpointing=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.training_step(_batch(model, 2), 0)
        forward_graphs = counter.frame_count
        with torch._dynamo.config.patch(error_on_recompile=True):  # a recompile in the recomputation raises
            loss.backward()
        assert forward_graphs >= 1 and counter.frame_count == forward_graphs
        assert all(p.grad is not None for p in model.unet.parameters() if p.requires_grad)
    finally:
        torch._dynamo.reset()
