"""Prior preservation's regularisation prompts (issue #12): tokenized once, the base text encoder's view of them
computed once, and one prompt drawn per sample of each training batch."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from lightning_modules.diffusion_loss import PriorPreservation, adapters_disabled


@dataclass(frozen=True)
class PriorPrompts:
    """Regularisation prompts of prior preservation: their token ids and the base text encoder's view of them, on
    the model's device. The base view never changes, so it is computed once (:meth:`encode`).
    """

    prompts: list[str]
    input_ids: torch.Tensor
    base_encoder_hidden_states: torch.Tensor

    @classmethod
    def encode(
        cls,
        prompts: list[str],
        tokenizer: PreTrainedTokenizerBase,
        encode_prompts: Callable[[torch.Tensor], torch.Tensor],
        trained_text_encoder: torch.nn.Module | None,
        device: torch.device,
    ) -> PriorPrompts:
        """Tokenize ``prompts`` and compute the base text encoder's view of them with ``encode_prompts``.

        ``trained_text_encoder`` is the text encoder when it trains a LoRA (its adapters are off meanwhile), else
        ``None``: a frozen text encoder is the base one.
        """
        input_ids = tokenizer(
            prompts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        # The trained text encoder's LoRA must not colour the target: it is the base model's own view of the prompt.
        base_view = nullcontext() if trained_text_encoder is None else adapters_disabled(trained_text_encoder)
        with base_view:
            base = encode_prompts(input_ids).float()
        return cls(list(prompts), input_ids, base)

    def draw(
        self,
        batch_size: int,
        weight: float,
        trained_text_encoder: torch.nn.Module | None,
        device: torch.device,
    ) -> PriorPreservation:
        """One regularisation prompt per sample, drawn from the global RNG (the step's seed: a resume draws the
        same), with the prior loss ``weight``; ``trained_text_encoder`` as in :meth:`encode`."""
        drawn = torch.randint(len(self.prompts), (batch_size,))  # the CPU RNG: the same draw on any device
        if self.input_ids.device.type == "cuda":
            # From pinned memory without blocking: a plain copy from the CPU waits for the GPU every step (issue #9).
            drawn = drawn.pin_memory().to(self.input_ids.device, non_blocking=True)
        else:
            drawn = drawn.to(self.input_ids.device)
        input_ids = self.input_ids[drawn].to(device)
        base = self.base_encoder_hidden_states[drawn].to(device)
        # A frozen text encoder is the base one; a trained one's LoRA view is computed now, with gradient.
        hidden = base if trained_text_encoder is None else trained_text_encoder(input_ids, return_dict=False)[0]
        return PriorPreservation(weight, hidden, base)
