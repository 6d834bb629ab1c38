"""Small checkpoints: only the LoRA tensors, plus what an exact resume needs (the run's seed, its planned length,
the RNG states). The frozen base model is never saved; it is reloaded from ``pretrained_model_name_or_path``."""

from __future__ import annotations

import os
from typing import Any

import torch

from lightning_modules.finite import check_finite


def save_lora_only(checkpoint: dict[str, Any], trainable: set[str], planned_steps: int | None) -> None:
    """Shrink Lightning's ``checkpoint`` to the ``trainable`` tensors and add the seed, ``planned_steps`` (when the
    model is attached to a trainer) and the RNG states."""
    # Only the LoRA tensors: the frozen base model is reloaded from `pretrained_model_name_or_path`.
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
    # The run's seed drives data order and per-step noise: a resume must use it even if the config
    # asked for a random seed (`seed_everything: true`).
    checkpoint["seed"] = int(os.environ.get("PL_GLOBAL_SEED", 0))
    if planned_steps is not None:  # the run's planned length, which shapes the LR schedule
        checkpoint["planned_steps"] = planned_steps
    checkpoint["rng_states"] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state_all()


def load_lora_only(checkpoint: dict[str, Any], trainable: set[str], model: torch.nn.Module) -> None:
    """Check that ``checkpoint`` holds every ``trainable`` tensor of ``model``, all finite; complete its state dict
    with ``model``'s frozen weights, and restore the run's seed and RNG states."""
    missing = sorted(trainable - set(checkpoint.get("state_dict", {})))
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
    checkpoint["state_dict"] = {**model.state_dict(), **checkpoint["state_dict"]}
    if "seed" in checkpoint:
        os.environ["PL_GLOBAL_SEED"] = str(checkpoint["seed"])
    states = checkpoint.get("rng_states", {})
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        # One state per GPU of the machine that saved it: a resume on fewer GPUs restores those it has.
        for index, state in enumerate(states["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, index)
