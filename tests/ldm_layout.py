"""Write a diffusers SD1.x model as one original-layout (CompVis/LDM) checkpoint file, for tests.

The renames are the inverse of diffusers' single-file converters, after diffusers'
``scripts/convert_diffusers_to_original_stable_diffusion.py`` (not in the wheel), generalised to any block
count / ``layers_per_block`` so they fit the tiny test model. Written independently of
``stable_diffusion.base_model``, so a test that loads the file through it compares against something it did
not compute itself. Imported by tests as ``from ldm_layout import ...`` (pytest puts ``tests/`` on the path).
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

__all__ = ["clip_to_ldm", "ldm_state_dict", "save_single_file", "unet_to_ldm", "vae_to_ldm"]

_RESNET = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Rename a diffusers UNet state dict to ``model.diffusion_model.*`` keys."""
    n, per = len(config["block_out_channels"]), config["layers_per_block"]
    down_attn = ["CrossAttn" in t for t in config["down_block_types"]]
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    pairs = [  # (diffusers prefix, ldm prefix)
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("conv_in.", "input_blocks.0.0."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
        ("mid_block.attentions.0.", "middle_block.1."),
        ("mid_block.resnets.0.", "middle_block.0."),
        ("mid_block.resnets.1.", "middle_block.2."),
    ]
    for i in range(n):
        for j in range(per):
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{i * (per + 1) + j + 1}.0."))
            if down_attn[i]:
                pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{i * (per + 1) + j + 1}.1."))
        for j in range(per + 1):
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{i * (per + 1) + j}.0."))
            if up_attn[i]:
                pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{i * (per + 1) + j}.1."))
        if i < n - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (per + 1)}.0.op."))
            slot = 2 if up_attn[i] else 1
            pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{i * (per + 1) + per}.{slot}."))
    out = {}
    for key, value in state.items():
        hf, ldm = next((h, s) for h, s in pairs if key.startswith(h))
        rest = key[len(hf) :]
        if ".resnets." in hf:
            for old, new in _RESNET:
                rest = rest.replace(old, new) if rest.startswith(old + ".") else rest
        out["model.diffusion_model." + ldm + rest] = value
    assert len(out) == len(state)
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Rename a diffusers VAE state dict to ``first_stage_model.*`` keys (1x1-conv attention)."""
    n, per = len(config["block_out_channels"]), config["layers_per_block"]
    pairs = [
        ("conv_shortcut", "nin_shortcut"),
        ("conv_norm_out", "norm_out"),
        ("mid_block.attentions.0.", "mid.attn_1."),
    ]
    for i in range(n):
        pairs += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.") for j in range(per)]
        pairs += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}.") for j in range(per + 1)]
        if i < n - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.", f"down.{i}.downsample."))
            pairs.append((f"up_blocks.{i}.upsamplers.0.", f"up.{n - 1 - i}.upsample."))
    pairs += [(f"mid_block.resnets.{i}.", f"mid.block_{i + 1}.") for i in range(2)]
    attn = [
        ("group_norm.", "norm."),
        ("to_q.", "q."),
        ("to_k.", "k."),
        ("to_v.", "v."),
        ("to_out.0.", "proj_out."),
    ]
    out = {}
    for key, value in state.items():
        new = key
        for hf, ldm in pairs:
            new = new.replace(hf, ldm)
        if ".attn_1." in new:
            for hf, ldm in attn:
                new = new.replace(hf, ldm)
            if value.ndim == 2:  # the original attention uses 1x1 convolutions
                value = value[:, :, None, None]
        out["first_stage_model." + new] = value
    return out


def clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a CLIP text model state dict to ``cond_stage_model.transformer.text_model.*`` keys."""
    out = {f"cond_stage_model.transformer.text_model.{k.removeprefix('text_model.')}": v for k, v in state.items()}
    # Real SD1.x checkpoints carry this buffer; the loader must cope with it.
    n_pos = state[next(k for k in state if k.endswith("position_embedding.weight"))].shape[0]
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(n_pos)[None]
    return out


def ldm_state_dict(
    unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel
) -> dict[str, torch.Tensor]:
    """The three models' weights under original SD1.x keys, as separate contiguous tensors (safetensors needs)."""
    state = unet_to_ldm(unet.state_dict(), dict(unet.config))
    state |= vae_to_ldm(vae.state_dict(), dict(vae.config))
    state |= clip_to_ldm(text_encoder.state_dict())
    return {k: v.contiguous().clone() for k, v in state.items()}


def save_single_file(diffusers_folder: str | Path, path: str | Path) -> Path:
    """Write the diffusers model in ``diffusers_folder`` as one ``.safetensors`` or ``.ckpt`` file at ``path``."""
    folder, path = Path(diffusers_folder), Path(path)
    state = ldm_state_dict(
        UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
        AutoencoderKL.from_pretrained(folder, subfolder="vae"),
        CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        safetensors.torch.save_file(state, path)
    elif path.suffix == ".ckpt":
        torch.save({"state_dict": state, "global_step": 0}, path)  # the original checkpoints' shape
    else:
        raise ValueError(f"{path}: the single file must end in .safetensors or .ckpt")
    return path
