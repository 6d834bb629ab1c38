"""NTU GenAI HW10's CLIP score: how well each generated image matches its prompt.

Why not ``torchmetrics.multimodal.CLIPScore``: it clamps the mean score at 0 (the HW's
``logits_per_image`` was not clamped, and a small or random CLIP gives negative scores), it cuts long
prompts by slicing ``input_ids`` after tokenising, which drops CLIP's end-of-text token that the text
embedding is read from, and it loads only a few hard-coded Hub names, not a local folder.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torchmetrics import Metric
from transformers import AutoTokenizer, CLIPModel

from stable_diffusion.hub_access import HubAccessError, hub_local_only, hub_offline, is_cached, not_cached_message

try:  # transformers >= 5: the PIL implementation, the same maths as the HW's (slow) CLIPImageProcessor
    from transformers import CLIPImageProcessorPil as _ImageProcessor
except ImportError:  # transformers 4: CLIPImageProcessor is the PIL/NumPy one
    from transformers import CLIPImageProcessor as _ImageProcessor

HW_CLIP = "openai/clip-vit-base-patch32"


class ClipModelError(RuntimeError):
    """The CLIP model cannot be loaded; the message says what to do."""


SETTING = "validation.clip_model"
SKIP = f" — or set {SETTING} null to skip the CLIP score (`likeness score`: --clip-model none)"


def check_clip_available(model_name_or_path: str | Path) -> None:
    """Raise the error ``load_clip`` would give for a missing model, in seconds and without loading it: a local folder
    must hold ``config.json``; a Hub id must be in the local cache or reachable (one quick probe)."""
    name = str(model_name_or_path)
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{SETTING} {path}: not a CLIP model folder (no config.json). Give a folder written by "
                f"CLIPModel.save_pretrained plus its tokenizer and image processor, or a Hub id like {HW_CLIP!r}{SKIP}."
            )
        return
    try:
        local_only = hub_local_only(name, None, SETTING)
    except HubAccessError as err:
        raise ClipModelError(f"{err}{SKIP}.") from err
    if local_only and not is_cached(name, "config.json"):
        raise ClipModelError(f"{not_cached_message(name, SETTING, SKIP)}.")


def load_clip(model_name_or_path: str | Path) -> tuple[CLIPModel, object, object]:
    """Load (model, tokenizer, image processor) from a local folder or a Hub id, with clear errors.

    A Hub id comes from the local cache when it is there, without the network; otherwise one quick probe decides
    (``stable_diffusion.hub_access``), so an offline machine fails in seconds, not after a minute of retries.
    """
    name = str(model_name_or_path)
    path = Path(name).expanduser()
    looks_like_path = path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_like_path:
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{SETTING} {path}: not a CLIP model folder (no config.json). Give a folder written by "
                "CLIPModel.save_pretrained plus its tokenizer and image processor, "
                f"or a Hub id like {HW_CLIP!r}{SKIP}."
            )
        source, local_only = path, True
    else:
        try:
            local_only = hub_local_only(name, None, SETTING)
        except HubAccessError as err:
            raise ClipModelError(f"{err}{SKIP}.") from err
        source = name
    try:
        model = CLIPModel.from_pretrained(source, local_files_only=local_only)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        processor = _ImageProcessor.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as err:
        if not looks_like_path and (local_only or hub_offline()):
            raise ClipModelError(f"{not_cached_message(name, SETTING, SKIP)}.") from err
        raise ClipModelError(
            f"{SETTING} {name}: could not load the CLIP model, tokenizer or image processor ({err}){SKIP}."
        ) from err
    return model.eval().requires_grad_(False), tokenizer, processor


class ClipScore(Metric):
    """Mean over images of ``100 * cos(image embedding, prompt embedding)``, the HW's ``logits_per_image``.

    The HW used ``openai/clip-vit-base-patch32``, whose learnt logit scale is exactly 100; here the 100 is
    written out so that any CLIP (a tiny random one in the tests) gives the same definition. Feed it only
    the images that have a face, as the HW did. Prompts longer than the model's context are truncated
    (keeping the end-of-text token). ``compute()`` is NaN before any image.

    The CLIP model is kept out of the metric's submodules, so it is never trained, never saved in a
    checkpoint, and stays where ``device`` puts it.

    Args:
        model_name_or_path: Hub id or local folder with the CLIP model, tokenizer and image processor.
        device: where CLIP runs; ``None`` follows the metric's device (e.g. the LightningModule's).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        model_name_or_path: str | Path = HW_CLIP,
        device: str | torch.device | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        model, self.tokenizer, self.processor = load_clip(model_name_or_path)
        object.__setattr__(self, "clip_model", model)  # plain attribute: not an nn.Module child
        self.clip_device = torch.device(device) if device is not None else None
        config = model.config.text_config
        self.max_length = min(self.tokenizer.model_max_length, config.max_position_embeddings)
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("images", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @torch.no_grad()
    def scores(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> Tensor:
        """``100 * cos`` of each image with its own prompt, shape ``(len(images),)``, on the CPU."""
        if len(images) != len(prompts):
            raise ValueError(f"ClipScore: got {len(images)} images but {len(prompts)} prompts.")
        device = self.clip_device or self.device
        model = self.clip_model.to(device)
        text = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        out = model(
            input_ids=text["input_ids"].to(device),
            attention_mask=text["attention_mask"].to(device),
            pixel_values=pixels["pixel_values"].to(device=device, dtype=model.dtype),
        )
        image_embeds = torch.nn.functional.normalize(out.image_embeds.double(), dim=-1)
        text_embeds = torch.nn.functional.normalize(out.text_embeds.double(), dim=-1)
        return (100.0 * (image_embeds * text_embeds).sum(dim=-1)).cpu()

    def update(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> None:
        """Add images (with a face) and the prompt each was generated from."""
        if not images and not prompts:
            return
        batch = self.scores(images, prompts)
        self.score_sum += batch.sum().to(self.score_sum.device)
        self.images += len(batch)

    def compute(self) -> Tensor:
        """The mean score, or NaN when no image was added."""
        if self.images == 0:
            return torch.tensor(math.nan, dtype=torch.float64)
        return self.score_sum / self.images
