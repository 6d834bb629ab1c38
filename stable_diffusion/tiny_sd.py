"""A tiny random-weight Stable Diffusion 1.x written in diffusers layout.

The demo and the tests cannot download a real model (no network), so they build one with the same
architecture family as SD1.5 — CLIP text encoder and BPE tokenizer, KL VAE, conditional UNet, DDPM
scheduler — only a few hundred kB big, save it with ``save_pretrained`` and load it back through the
production ``from_pretrained`` path. Usage::

    python -m stable_diffusion.tiny_sd .cache/demo/tiny-sd --clip .cache/demo/tiny-clip
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from stable_diffusion.library_noise import quiet_library_noise

# Before diffusers' import, which makes transformers print its torchvision notice.
quiet_library_noise()

import torch  # noqa: E402
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

CROSS_ATTENTION_DIM = 32


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table (the BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def save_tiny_tokenizer(folder: str | Path, model_max_length: int = 77) -> CLIPTokenizer:
    """Write a character-level CLIP BPE tokenizer (no merges) and load it back."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    vocab_list = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab_list)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        model_max_length=model_max_length,
        pad_token="<|endoftext|>",
    )
    tokenizer.save_pretrained(folder)
    return CLIPTokenizer.from_pretrained(folder)


def build_tiny_sd(folder: str | Path, seed: int = 0) -> StableDiffusionPipeline:
    """Build a tiny SD1.x pipeline with random weights; its tokenizer is written to ``folder/tokenizer``."""
    torch.manual_seed(seed)
    tokenizer = save_tiny_tokenizer(Path(folder) / "tokenizer")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=CROSS_ATTENTION_DIM,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=CROSS_ATTENTION_DIM,
        )
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    )
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_ATTENTION_DIM,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    # SD1.5's own scheduler config: PNDM for sampling; training reads it as DDPM, as real checkpoints do.
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_clip(folder: str | Path, image_size: int = 32, context: int = 32, seed: int = 0) -> Path:
    """Write a tiny random CLIP (model, char-level tokenizer, PIL image processor) like a Hub checkpoint.

    Its logit scale is the real CLIP's learnt 100, so ``logits_per_image`` = 100 * cos, as in the HW.
    """
    from transformers import CLIPConfig, CLIPModel

    from metrics.clip_score import _ImageProcessor

    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    tokenizer = save_tiny_tokenizer(folder, model_max_length=context)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text = {"vocab_size": len(tokenizer), "max_position_embeddings": context}
    text |= {"bos_token_id": tokenizer.convert_tokens_to_ids("<|startoftext|>"), "eos_token_id": eos}
    tower = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = CLIPConfig(
        text_config=tower | text | {"pad_token_id": eos},
        vision_config=tower | {"image_size": image_size, "patch_size": 8},
        projection_dim=16,
        logit_scale_init_value=math.log(100.0),
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    crop = {"height": image_size, "width": image_size}
    _ImageProcessor(size={"shortest_edge": image_size}, crop_size=crop).save_pretrained(folder)
    return folder


def save_tiny_sd(folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny model in diffusers layout to ``folder`` (idempotent) and return the folder."""
    folder = Path(folder)
    if (folder / "model_index.json").exists():
        return folder
    build_tiny_sd(folder, seed=seed).save_pretrained(folder, safe_serialization=True)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="where to write the diffusers folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clip", type=Path, help="also write a tiny random CLIP (for the CLIP score) here")
    args = parser.parse_args(argv)
    print(f"tiny SD model in {save_tiny_sd(args.folder, args.seed)}")
    if args.clip:
        print(f"tiny CLIP model in {save_tiny_clip(args.clip, seed=args.seed)}")


if __name__ == "__main__":
    main()
