"""Image–caption pairs as training tensors: RGB in [-1, 1] at a square resolution, captions as token ids."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from datamodules.folder_scan import Pair


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


class ImageCaptionDataset(Dataset):
    """Serves ``{"pixel_values", "input_ids", "caption"}`` for each pair.

    With :attr:`latents` set (the latent cache, center crop only) it serves ``latent_mean``/``latent_std`` of the
    drawn orientation instead of pixels; with :attr:`hidden_states` set (a frozen text encoder's outputs per pair)
    also ``encoder_hidden_states``. Random draws are the same either way, so cached and live runs see the same
    flips.

    Indexed by ``(index, seed)`` tuples from :class:`~datamodules.epoch_sampler.EpochSampler` so that a random crop
    or flip is a function of the seed alone: the same on resume and in any worker. A plain ``int`` index means no
    random augmentation (seed 0).

    Args:
        pairs: image–caption pairs.
        tokenizer: the base model's tokenizer; captions are padded to its ``model_max_length``.
        resolution: side of the square training image; the short side is resized to it, then cropped.
        center_crop: crop the center; otherwise a random crop.
        random_flip: flip horizontally with probability 0.5.
    """

    def __init__(
        self,
        pairs: list[Pair],
        tokenizer: PreTrainedTokenizerBase,
        resolution: int = 512,
        center_crop: bool = True,
        random_flip: bool = False,
    ) -> None:
        self.pairs = pairs
        self.tokenizer = tokenizer
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.input_ids = self.tokenize([pair.caption for pair in pairs])  # once, not every step
        self.latents: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]] | None = None
        self.hidden_states: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def transform(self, image: Image.Image, generator: torch.Generator | None) -> torch.Tensor:
        size = self.resolution
        scale = size / min(image.size)
        new_size = (max(size, round(image.width * scale)), max(size, round(image.height * scale)))
        image = image.resize(new_size, Image.Resampling.BICUBIC)
        spare_x, spare_y = image.width - size, image.height - size
        if self.center_crop or generator is None:
            left, top = spare_x // 2, spare_y // 2
        else:
            left = int(torch.randint(spare_x + 1, (1,), generator=generator))
            top = int(torch.randint(spare_y + 1, (1,), generator=generator))
        image = image.crop((left, top, left + size, top + size))
        if self._flip(generator):
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()

    def _flip(self, generator: torch.Generator | None) -> bool:
        return self.random_flip and generator is not None and torch.rand(1, generator=generator).item() < 0.5

    def pixels(self, index: int, flip: bool = False) -> torch.Tensor:
        """Pair ``index``'s center-cropped training pixels, mirrored after the crop as :meth:`transform` does."""
        pixels = self.transform(load_rgb(self.pairs[index].image), None)
        return pixels.flip(-1) if flip else pixels

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, seed = key if isinstance(key, tuple) else (key, None)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        item = {"input_ids": self.input_ids[index], "caption": self.pairs[index].caption}
        if self.latents is not None:
            # Center crop draws nothing; the flip draw is the one `transform` would make.
            mean, std = self.latents[index, self._flip(generator)]
            item |= {"latent_mean": mean, "latent_std": std}
        else:
            item["pixel_values"] = self.transform(load_rgb(self.pairs[index].image), generator)
        if self.hidden_states is not None:
            item["encoder_hidden_states"] = self.hidden_states[index]
        return item
