"""Image–caption pairs as training tensors: RGB in [-1, 1] at a square resolution, captions as token ids."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from datamodules.face_boxes import Box, PhotoFace, soft_face_mask
from datamodules.folder_scan import Pair

Crop = Literal["center", "random", "face"]


def load_rgb(path) -> Image.Image:
    """Open a photo upright and as 8-bit RGB, whatever mode it was saved in."""
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)  # phones store the rotation in EXIF, not in the pixels
        image.load()
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: PIL's convert("RGB") clips at 255 instead of scaling, so scale by hand.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.round(array / peak * 255).clip(0, 255).astype(np.uint8))
    if image.mode == "P" or image.mode == "LA":
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        # Transparent pixels keep arbitrary colours; show them on white as viewers do.
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        image = background
    return image.convert("RGB")  # grayscale, CMYK, YCbCr...


def cut_off(tokenizer, texts: list[str]) -> list[tuple[int, str]]:
    """``(index, what is cut)`` of each text longer than the text encoder reads (77 tokens for SD1.x's CLIP, start
    and end included): diffusers' and kohya's scripts cut the rest, as likeness does."""
    limit = tokenizer.model_max_length
    full = tokenizer(texts, truncation=False, verbose=False).input_ids if texts else []
    return [(i, tokenizer.decode(ids[limit - 1 : -1]).strip()) for i, ids in enumerate(full) if len(ids) > limit]


@dataclass(frozen=True)
class CropWindow:
    """The part ``box = (left, top, width, height)`` of the upright photo that fills the training square.

    Center and random crops resize the whole photo to ``resized`` (short side = resolution) and cut the square at
    the integer ``offset``; a face crop resamples ``box`` straight to the square (``resized`` is ``None``).
    """

    box: Box
    resized: tuple[int, int] | None = None
    offset: tuple[int, int] = (0, 0)

    def map_box(self, box: Box, size: int) -> Box:
        """A box ``(x, y, w, h)`` of photo pixels in pixels of the ``size`` × ``size`` square (before a flip)."""
        left, top, width, height = self.box
        sx, sy = size / width, size / height
        return (box[0] - left) * sx, (box[1] - top) * sy, box[2] * sx, box[3] * sy

    @property
    def key(self) -> str:
        """What the latent cache keys the crop by."""
        return "center" if self.resized is not None else "face:" + ",".join(f"{v:.4f}" for v in self.box)


class ImageCaptionDataset(Dataset):
    """Serves ``{"pixel_values", "input_ids", "caption"}`` for each pair, and ``face_mask`` with ``face_mask``.

    With :attr:`latents` set (the latent cache: center or unjittered face crops) it serves ``latent_mean`` /
    ``latent_std`` of the drawn orientation instead of pixels; with :attr:`hidden_states` set (a frozen text
    encoder's outputs per caption, :attr:`empty_hidden_state` for the empty prompt) also ``encoder_hidden_states``.
    Random draws are the same either way, so cached and live runs see the same flips and dropped captions.

    Indexed by ``(index, seed)`` tuples from :class:`~datamodules.epoch_sampler.EpochSampler` so that every random
    draw (crop, flip, caption dropout, in this order) is a function of the seed alone: the same on resume and in any
    worker. A plain ``int`` index means no random augmentation.

    Args:
        pairs: image–caption pairs.
        tokenizer: the base model's tokenizer; captions are padded to its ``model_max_length``.
        resolution: side of the square training image.
        crop: ``center``: the short side resized to ``resolution``, the middle square; ``random``: a random square
            of that; ``face``: the square around ``faces[i]`` (:meth:`PhotoFace.square`), center crop without one.
        random_flip: flip horizontally with probability 0.5 (after the crop; masks flip with the pixels).
        faces: each pair's :class:`PhotoFace`; needed for ``crop="face"`` and ``face_mask``.
        face_margin: face crop side = face side × (1 + 2 · margin), within the photo.
        face_scale_jitter: face crop side × a factor drawn in [1 − jitter, 1 + jitter] per sample.
        face_mask: serve ``face_mask`` (1, h, w) at latent resolution: 1 on the face, 0 away from it
            (:func:`soft_face_mask`; zeros without a face).
        latent_factor: training pixels per latent pixel (the VAE's downsampling).
        caption_template: what is trained on; ``{caption}`` stands for the caption file's text.
        caption_dropout: probability of training a sample on the empty prompt.
    """

    def __init__(
        self,
        pairs: list[Pair],
        tokenizer: PreTrainedTokenizerBase,
        resolution: int = 512,
        crop: Crop = "center",
        random_flip: bool = False,
        faces: list[PhotoFace] | None = None,
        face_margin: float = 0.75,
        face_scale_jitter: float = 0.0,
        face_mask: bool = False,
        latent_factor: int = 8,
        caption_template: str = "{caption}",
        caption_dropout: float = 0.0,
    ) -> None:
        if (crop == "face" or face_mask) and (faces is None or len(faces) != len(pairs)):
            raise ValueError("A face crop or face mask needs one PhotoFace per pair (FaceBoxes.find).")
        self.pairs = pairs
        self.tokenizer = tokenizer
        self.resolution = resolution
        self.crop = crop
        self.random_flip = random_flip
        self.faces = faces
        self.face_margin = face_margin
        self.face_scale_jitter = face_scale_jitter
        self.face_mask = face_mask
        self.latent_factor = latent_factor
        self.caption_dropout = caption_dropout
        self.captions = [caption_template.replace("{caption}", pair.caption) for pair in pairs]
        self.input_ids = self.tokenize(self.captions)  # once, not every step
        self._warn_of_long_captions()
        self.empty_input_ids = self.tokenize([""])[0]
        self.latents: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]] | None = None
        self.hidden_states: torch.Tensor | None = None
        self.empty_hidden_state: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def cacheable(self) -> bool:
        """Whether every crop is the same each epoch, so its latents can be encoded once."""
        return self.crop == "center" or (self.crop == "face" and self.face_scale_jitter == 0)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def _warn_of_long_captions(self) -> None:
        # The text encoder reads model_max_length tokens (77 for SD1.x's CLIP, start and end included); the rest of a
        # longer caption is cut, as in diffusers' and kohya's scripts (without max_token_length), so a trigger word
        # at its end never trains. Said once, with what is lost.
        limit = self.tokenizer.model_max_length
        long = cut_off(self.tokenizer, self.captions)
        if not long:
            return
        index, lost = long[0]
        pair = self.pairs[index]
        rank_zero_warn(
            f"{len(long)} caption(s) are longer than the text encoder's {limit} tokens and are cut: training never "
            f"sees the rest (e.g. {pair.image.with_suffix('.txt').name} loses {lost!r}). Shorten them, or put the "
            "trigger word first."
        )

    def window(self, index: int, size: tuple[int, int], generator: torch.Generator | None) -> CropWindow:
        """Pair ``index``'s crop of its ``size`` (width, height) photo, drawing from ``generator`` if random."""
        face = self.faces[index] if self.faces is not None else None
        if self.crop == "face" and face is not None and face.box is not None:
            scale = 1.0
            if self.face_scale_jitter and generator is not None:
                scale += self.face_scale_jitter * (2 * torch.rand(1, generator=generator).item() - 1)
            return CropWindow(face.square(self.face_margin, scale))
        res, (width, height) = self.resolution, size
        scale = res / min(size)
        resized = (max(res, round(width * scale)), max(res, round(height * scale)))
        spare_x, spare_y = resized[0] - res, resized[1] - res
        if self.crop == "random" and generator is not None:
            left = int(torch.randint(spare_x + 1, (1,), generator=generator))
            top = int(torch.randint(spare_y + 1, (1,), generator=generator))
        else:
            left, top = spare_x // 2, spare_y // 2
        sx, sy = width / resized[0], height / resized[1]
        return CropWindow((left * sx, top * sy, res * sx, res * sy), resized, (left, top))

    def render(self, image: Image.Image, window: CropWindow, flip: bool) -> torch.Tensor:
        """The training square of ``image``: (3, resolution, resolution) in [-1, 1], mirrored after the crop."""
        size = self.resolution
        if window.resized is not None:
            left, top = window.offset
            image = image.resize(window.resized, Image.Resampling.BICUBIC).crop((left, top, left + size, top + size))
        else:
            left, top, width, height = window.box
            box = (left, top, left + width, top + height)
            image = image.resize((size, size), Image.Resampling.BICUBIC, box=box)
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()

    def face_box(self, index: int, window: CropWindow, flip: bool) -> Box | None:
        """Pair ``index``'s face box in pixels of its training square (mirrored with the flip), if it has one."""
        face = self.faces[index] if self.faces is not None else None
        if face is None or face.box is None:
            return None
        x, y, w, h = window.map_box(face.box, self.resolution)
        return (self.resolution - x - w, y, w, h) if flip else (x, y, w, h)

    def mask(self, index: int, window: CropWindow, flip: bool) -> torch.Tensor:
        """Pair ``index``'s :func:`soft_face_mask` for this crop and flip; zeros without a face."""
        box = self.face_box(index, window, False)
        if box is None:
            side = self.resolution // self.latent_factor
            return torch.zeros(1, side, side)
        mask = soft_face_mask(box, self.resolution, self.latent_factor)
        return mask.flip(-1) if flip else mask  # exactly the mirror image, as the pixels are mirrored

    def draw(self, index: int, seed: int | None, size: tuple[int, int] | None) -> tuple[CropWindow | None, bool, bool]:
        """The (window, flip, caption dropped) of pair ``index`` at ``seed``; no window without the photo's size
        (cached latents: their crops draw nothing)."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        window = self.window(index, size, generator) if size is not None else None
        flip = self.random_flip and generator is not None and torch.rand(1, generator=generator).item() < 0.5
        dropped = bool(self.caption_dropout) and generator is not None
        dropped = dropped and torch.rand(1, generator=generator).item() < self.caption_dropout
        return window, flip, dropped

    def pixels(self, index: int, flip: bool = False) -> torch.Tensor:
        """Pair ``index``'s training pixels without random draws (what the latent cache encodes), maybe mirrored."""
        image = load_rgb(self.pairs[index].image)
        return self.render(image, self.window(index, image.size, None), flip)

    def crop_key(self, index: int) -> str:
        """The latent cache's key of pair ``index``'s (deterministic) crop."""
        face = self.faces[index] if self.faces is not None else None
        if self.crop != "face" or face is None or face.box is None:
            return "center"
        return self.window(index, (face.width, face.height), None).key

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image = load_rgb(self.pairs[index].image) if self.latents is None else None
        face = self.faces[index] if self.faces is not None else None
        size = image.size if image is not None else (face.width, face.height) if face is not None else None
        window, flip, dropped = self.draw(index, seed, size)
        item: dict = {"caption": "" if dropped else self.captions[index]}
        item["input_ids"] = self.empty_input_ids if dropped else self.input_ids[index]
        if image is None:
            mean, std = self.latents[index, flip]
            item |= {"latent_mean": mean, "latent_std": std}
        else:
            item["pixel_values"] = self.render(image, window, flip)
        if self.face_mask:
            item["face_mask"] = self.mask(index, window, flip)
        if self.hidden_states is not None:
            item["encoder_hidden_states"] = self.empty_hidden_state if dropped else self.hidden_states[index]
        return item
