"""The first training crops as the model sees them, with the face box and the loss weights (issue #12).

A crop that cuts the chin, a face box on the wrong person or a mask off the face is invisible in the loss curve;
one picture at the start of training shows it. The picture goes to TensorBoard (``train/crops``) and into the run
folder as ``training_crops.png``.
"""

from __future__ import annotations

import io
import os
import textwrap
from itertools import islice
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from PIL import Image, ImageDraw, ImageFont

from callbacks.run_folders import log_dir
from datamodules.epoch_sampler import EpochSampler
from datamodules.files import write_atomically
from datamodules.image_caption_dataset import ImageCaptionDataset, load_rgb
from lightning_modules.diffusion_loss import face_loss_weights

FILE_NAME = "training_crops.png"
LABEL = 70  # height of the text under each crop
HEADER = 26
BOX_COLOUR = (40, 220, 90)
# Brightness follows the loss weight (the face's weight: full brightness), but never below this: a background
# weighted near 0 stays visible.
DIMMEST = 0.2


def _font(size: int = 13) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


class TrainingCrops(L.Callback):
    """At the start of ``fit``, draw the first training samples of rank 0 (epoch 0, in the data order) as the
    model gets them before the VAE: the crop, flipped if drawn so, the face box in green and, with a face-weighted
    loss, the pixels darkened where the loss weighs less. Under each: the photo and the caption trained on.

    Needs the data module's ``train_dataset`` to be an :class:`ImageCaptionDataset`; otherwise it does nothing.

    Args:
        num_photos: how many samples to draw (0: none).
        tile_size: side of each crop in the picture, in pixels.
    """

    def __init__(self, num_photos: int = 4, tile_size: int = 256) -> None:
        super().__init__()
        if num_photos < 0:
            raise ValueError(f"training_crops.num_photos {num_photos}: give 0 (none) or more.")
        if tile_size < 32:
            raise ValueError(f"training_crops.tile_size {tile_size}: give 32 pixels or more.")
        self.num_photos = num_photos
        self.tile_size = tile_size
        self.path: Path | None = None  # the picture written, once written

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dataset = getattr(getattr(trainer, "datamodule", None), "train_dataset", None)
        if not self.num_photos or not isinstance(dataset, ImageCaptionDataset):
            return
        # On every rank: trainer.log_dir is a broadcast. Asked on rank 0 alone it paired with rank 1's next
        # collective (DDP's buffer sync in the first training step) and fed it garbage (issue #8's deadlocks).
        self._write(trainer, pl_module, dataset, log_dir(trainer) / FILE_NAME)

    @rank_zero_only
    def _write(
        self, trainer: L.Trainer, pl_module: L.LightningModule, dataset: ImageCaptionDataset, path: Path
    ) -> None:
        sheet = self.sheet(dataset, pl_module, world_size=trainer.world_size)
        self.path = path
        buffer = io.BytesIO()
        sheet.save(buffer, format="PNG")
        write_atomically(self.path, buffer.getbuffer())
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("train/crops", np.asarray(sheet), trainer.global_step, dataformats="HWC")
        rank_zero_info(f"The first training crops, with face boxes and loss weights: {self.path}")

    def sheet(self, dataset: ImageCaptionDataset, pl_module: Any, world_size: int = 1) -> Image.Image:
        """The picture: one column per sample, the legend on top."""
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        samples = list(islice(EpochSampler(len(dataset), seed=seed, world_size=world_size), self.num_photos))
        hparams = getattr(pl_module, "hparams", {})
        weights = (hparams.get("face_loss_weight", 1.0), hparams.get("background_loss_weight", 1.0))
        tile, font = self.tile_size, _font()
        sheet = Image.new("RGB", (tile * len(samples), HEADER + tile + LABEL), "white")
        draw = ImageDraw.Draw(sheet)
        legend = f"crop: {dataset.crop}; green: face box"
        if dataset.face_mask:
            legend += f"; brightness: loss weight (face {weights[0]:g}, background {weights[1]:g})"
        draw.text((6, 6), legend, fill="black", font=font)
        for column, (index, sample_seed) in enumerate(samples):
            crop, caption = self.tile(dataset, index, sample_seed, weights)
            left = column * tile
            sheet.paste(crop, (left, HEADER))
            name = dataset.pairs[index].image.name
            if dataset.faces is not None and dataset.faces[index].box is None:
                name += " (no face)"
            lines = [name, *textwrap.wrap(caption or "(empty prompt: caption dropout)", width=tile // 7)][:4]
            draw.multiline_text((left + 4, HEADER + tile + 4), "\n".join(lines), fill="black", font=font, spacing=2)
            draw.line([(left, HEADER), (left, sheet.height)], fill="gray")
        return sheet

    def tile(
        self, dataset: ImageCaptionDataset, index: int, seed: int, weights: tuple[float, float]
    ) -> tuple[Image.Image, str]:
        """Sample ``(index, seed)`` drawn as the training step gets it, and its caption."""
        image = load_rgb(dataset.pairs[index].image)
        window, flip, dropped = dataset.draw(index, seed, image.size)
        pixels = dataset.render(image, window, flip)  # what the VAE encodes (or encoded into the cache)
        array = ((pixels.permute(1, 2, 0) + 1) * 127.5).clamp(0, 255)
        if dataset.face_mask:
            weight = face_loss_weights(dataset.mask(index, window, flip)[None], *weights)
            weight = torch.nn.functional.interpolate(weight, size=array.shape[:2], mode="bilinear")[0, 0]
            array = array * (weight / weight.max()).clamp(min=DIMMEST)[..., None]
        crop = Image.fromarray(array.round().byte().numpy()).resize((self.tile_size,) * 2, Image.Resampling.LANCZOS)
        box = dataset.face_box(index, window, flip)
        if box is not None:
            scale = self.tile_size / dataset.resolution
            x, y, w, h = (v * scale for v in box)
            ImageDraw.Draw(crop).rectangle([x, y, x + w, y + h], outline=BOX_COLOUR, width=2)
        return crop, "" if dropped else dataset.captions[index]
