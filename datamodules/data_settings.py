"""The ``data`` settings checked before anything loads: prompt files, sizes, crop and caption settings, prior prompts.

Each check fails naming the setting. The data module calls them as it is built; train.py calls the ones that need
no data module with the ``data`` (and ``model``) config before the base model loads (issue #10).
"""

from __future__ import annotations

from pathlib import Path
from typing import get_args

from lightning.pytorch.utilities import rank_zero_warn

from datamodules.image_caption_dataset import Crop, cut_off


def read_prompts(prompts: str | list[str] | None, setting: str) -> list[str]:
    """Prompts from a list, or from a text file with one prompt per line (blank lines and ``#`` comment lines
    ignored, as kohya's sample-prompt files)."""
    if prompts is None:
        return []
    if isinstance(prompts, list):
        return [p.strip() for p in prompts if p.strip()]
    path = Path(prompts).expanduser()
    if path.is_dir():
        listing = ", ".join(sorted(p.name for p in path.glob("*.txt"))[:3]) or "none"
        raise ValueError(
            f"{setting}: {path} is a folder; give the prompt file itself (.txt files there: {listing}), one prompt "
            "per line."
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"{setting}: prompt file {path} does not exist. Give a text file with one prompt per line, "
            "or a YAML list of prompts."
        )
    try:
        text = path.read_text(encoding="utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        raise ValueError(f"{setting}: prompt file {path} is not UTF-8 text ({err}).") from None
    # Lines end at \n, \r\n or \r only: str.splitlines also splits at U+2028, U+0085, \v, \f ..., which made two
    # prompts of one and moved every later prompt's index, and so its seed and valid_image_<i> number.
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    found = [prompt for line in lines if (prompt := " ".join(line.split())) and not prompt.startswith("#")]
    if not found:
        raise ValueError(
            f"{setting}: prompt file {path} has no prompts. Write one prompt per line, or set {setting}: null."
        )
    return found


def warn_of_long_prompts(tokenizer, prompts: list[str], setting: str) -> None:
    """Said once, in words, before generating: diffusers says it for every image, as a list of token strings."""
    if tokenizer is None or not (long := cut_off(tokenizer, prompts)):
        return
    index, lost = long[0]
    rank_zero_warn(
        f"{len(long)} prompt(s) of {setting} are longer than the text encoder's {tokenizer.model_max_length} "
        f"tokens and are cut: their images ignore the rest (e.g. prompt {index} loses {lost!r}). Shorten them."
    )


def check_sizes(resolution: int, batch_size: int, images_per_prompt: int) -> None:
    """Settings that would fail at step 1 (or train on nothing) fail now, naming the setting."""
    if resolution < 8 or resolution % 8:
        raise ValueError(f"data.resolution {resolution}: give a positive multiple of 8 (SD1.5 was trained at 512).")
    if batch_size < 1:
        raise ValueError(f"data.batch_size {batch_size}: give 1 or more.")
    if images_per_prompt < 1:
        raise ValueError(f"data.images_per_prompt {images_per_prompt}: give 1 or more.")


def check_crop_and_captions(
    crop: str = "center",
    center_crop: bool = True,
    face_margin: float = 0.75,
    face_scale_jitter: float = 0.0,
    caption_template: str = "{caption}",
    caption_dropout: float = 0.0,
) -> Crop:
    """The crop to train with (``center_crop: false`` is the old spelling of ``crop: random``); bad face and caption
    settings fail here, naming the setting (train.py can call it with the ``data`` config before the model loads)."""
    if crop not in get_args(Crop):
        raise ValueError(f"data.crop {crop!r}: choose one of {', '.join(get_args(Crop))}.")
    if not center_crop:
        if crop == "face":
            raise ValueError(
                "data.center_crop false (a random crop) contradicts data.crop face: drop data.center_crop, which is "
                "deprecated, and choose with data.crop."
            )
        rank_zero_warn("data.center_crop is deprecated: write data.crop: random instead of data.center_crop: false.")
        crop = "random"
    if not face_margin >= 0:  # `not >=` also catches NaN
        raise ValueError(f"data.face_margin {face_margin}: give 0 or more (0.75: a square 2.5 face boxes wide).")
    if not 0 <= face_scale_jitter < 1:
        raise ValueError(f"data.face_scale_jitter {face_scale_jitter}: give a number in [0, 1) (0: no jitter).")
    if crop != "face" and (face_scale_jitter or face_margin != 0.75):
        # Only a face crop reads them: without this a user who set them trains on a crop they did not ask for.
        rank_zero_warn(
            f"data.face_margin {face_margin} and data.face_scale_jitter {face_scale_jitter} only shape a face crop: "
            f"data.crop is {crop}, so they are ignored. Set data.crop: face to use them."
        )
    if "{caption}" not in caption_template:
        raise ValueError(
            f"data.caption_template {caption_template!r} has no {{caption}}: write where each caption goes, e.g. "
            "'photo of sks man, {caption}'."
        )
    if not 0 <= caption_dropout < 1:
        raise ValueError(
            f"data.caption_dropout {caption_dropout}: give a probability in [0, 1) (0.1: one sample in ten)."
        )
    return crop  # type: ignore[return-value]


def check_prior_settings(prior_loss_weight: float, prior_prompts: str | list[str] | None) -> list[str]:
    """The regularisation prompts of prior preservation (issue #12); a weight without prompts fails here, naming
    both settings (train.py can call it with the ``model`` and ``data`` config before the base model loads)."""
    prompts = read_prompts(prior_prompts, "data.prior_prompts")
    if prior_loss_weight > 0 and not prompts:
        raise ValueError(
            f"model.prior_loss_weight {prior_loss_weight} needs regularisation prompts: set data.prior_prompts to a "
            "file with one prompt per line or a list (e.g. '[a photo of a man]'), or model.prior_loss_weight to 0."
        )
    return prompts
