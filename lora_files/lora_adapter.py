"""The peft LoRA adapter on a model as the export formats read it: whether it is there, its tensors, CLIP paths.

Shared by the diffusers file (:mod:`lora_files.lora_formats`) and the kohya file
(:mod:`lora_files.kohya_lora`), so that each format depends on this module and not on the other.
"""

from __future__ import annotations

import torch
from peft import get_peft_model_state_dict

__all__ = ["ADAPTER_NAME", "has_lora", "lora_tensors", "text_model_path"]

ADAPTER_NAME = "default"
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def has_lora(model: torch.nn.Module | None, adapter_name: str = ADAPTER_NAME) -> bool:
    """Whether ``model`` carries a peft LoRA adapter called ``adapter_name``."""
    return model is not None and adapter_name in (getattr(model, "peft_config", None) or {})


def lora_tensors(model: torch.nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """peft's state dict (keys ``<module>.lora_A.weight``), detached and contiguous on the CPU."""
    init = model.peft_config[adapter_name].init_lora_weights
    if isinstance(init, str) and init.startswith(_BASE_CHANGING_INITS):
        # These inits subtract the initial LoRA from the base weights, so A/B alone are not a delta
        # against the published base model that every loader applies them to.
        raise ValueError(f"a LoRA initialised with {init!r} changed the base weights; it cannot be exported")
    # No embedding layers: likeness never trains them (peft's "auto" looks for the base model's config file to
    # guess whether the vocabulary grew, and warns where a local model folder has none).
    state = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def text_model_path(module_path: str) -> str:
    """CLIP module path with the ``text_model.`` level that transformers 5 dropped and every tool expects."""
    return module_path if module_path.startswith("text_model.") else f"text_model.{module_path}"
