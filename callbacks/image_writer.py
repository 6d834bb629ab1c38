"""``predict``: write the generated images to a folder, with prompt and seed in each PNG."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image

from callbacks.export_facts import step_folder
from callbacks.prompt_grid import save_png
from callbacks.run_folders import log_dir

# <prompt index>_<image index>.png, as write_on_batch_end names them (more digits past 999 prompts, 99 images).
PREDICT_NAME = re.compile(r"\d{3,}_\d{2,}\.png")


def generation_settings(pl_module: L.LightningModule, step: int) -> dict[str, object]:
    """How an image was generated, besides its prompt and seed: what a PNG's metadata needs to make it again."""
    hp = pl_module.hparams
    keys = {"num_inference_steps": "num_inference_steps", "guidance_scale": "guidance_scale"}
    keys |= {"image_size": "image_size", "base_model": "pretrained_model_name_or_path"}
    settings = {name: hp[key] for name, key in keys.items() if hp.get(key) is not None}
    base = getattr(pl_module, "base", None)
    sampler = hp.get("sampler") or (base.sampler_config.get("_class_name") if base is not None else None)
    if sampler:  # another sampler, other pixels (up to 54 grey levels in a helper's run)
        settings["sampler"] = sampler
    if hp.get("negative_prompt") and hp.get("guidance_scale", 7.5) > 1:  # diffusers ignores it without guidance
        settings["negative_prompt"] = hp["negative_prompt"]
    return settings | {"global_step": step}


def checkpoint_id(ckpt_path: str | Path | None) -> str:
    """Which checkpoint file made a predicted image, without writing its path (a user name) into shared pictures.
    With the step (``global_step`` beside it): a ``last.ckpt`` overwritten by a longer run is another checkpoint."""
    if not ckpt_path:
        return "base model"
    return hashlib.sha256(str(Path(ckpt_path).resolve()).encode()).hexdigest()[:16]


def earlier_predictions(folder: Path) -> dict[Path, str | None]:
    """The images a likeness predict wrote into ``folder`` (named as it names them, with its prompt and step in
    the PNG's text), each with ``<checkpoint_id>@<step>`` of the checkpoint that made it (None: an older likeness
    recorded no id)."""
    found: dict[Path, str | None] = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not PREDICT_NAME.fullmatch(path.name):
            continue
        try:
            with Image.open(path) as old:
                text = dict(getattr(old, "text", {}))
        except OSError:
            continue
        if {"prompt", "global_step"} <= set(text):
            found[path] = text.get("checkpoint_id") and f"{text['checkpoint_id']}@{text['global_step']}"
    return found


def checkpoint_step(ckpt_path: str | Path | None) -> int:
    """The step a checkpoint file was saved at (0: the base model alone)."""
    if not ckpt_path:
        return 0
    import torch

    checkpoint = torch.load(ckpt_path, weights_only=True, map_location="cpu", mmap=True)
    return int(checkpoint.get("global_step", 0))


def check_predict_folder(output_dir: str | Path, ckpt_path: str | Path | None) -> None:
    """Refuse a ``predict_writer.output_dir`` that is a file, or that holds another checkpoint's predicted images:
    the new images would replace some of them and mix with the rest (they were deleted without a word before)."""
    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"predict_writer.output_dir {folder}: is a file, not a folder. Give a folder for the images.")
    this = f"{checkpoint_id(ckpt_path)}@{checkpoint_step(ckpt_path)}"
    others = [path.name for path, made_by in earlier_predictions(folder).items() if made_by != this]
    if others:
        listing = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise ValueError(
            f"predict_writer.output_dir {folder}: holds {len(others)} image(s) predicted with another checkpoint "
            f"or another step of it, or by an older likeness ({listing}); the new ones would replace some and mix with the rest. Give a new or empty folder, or "
            "move those images away."
        )


class ImageWriter(BasePredictionWriter):
    """Writes ``<prompt index>_<image index>.png`` for every predicted image.

    Args:
        output_dir: folder for the images; default ``<run folder>/predict/step<NNNNNN>``, in the folder of the
            run the checkpoint comes from (the checkpoint's step).
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self._folder: Path | None = None
        self._checkpoint = checkpoint_id(None)

    def folder(self, trainer: L.Trainer) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        return log_dir(trainer) / "predict" / step_folder(trainer.lightning_module.loaded_step)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Once, on every rank: trainer.log_dir is a broadcast, so asking it per image would pair up only while
        # every rank writes as many images as the others.
        self._folder = self.folder(trainer)
        self._checkpoint = checkpoint_id(trainer.ckpt_path)
        if self.output_dir:  # a folder the user chose; the default one is this checkpoint's (its run and step)
            check_predict_folder(self._folder, trainer.ckpt_path)
        if trainer.is_global_zero:
            self._remove_earlier_predictions()
        trainer.strategy.barrier()  # no rank writes an image before rank 0 has removed the old ones

    def _remove_earlier_predictions(self) -> None:
        """An earlier predict of this checkpoint with more prompts or images left files the new one does not
        overwrite, which would pass for this one's: they go, and the log says so. A user's own files stay."""
        earlier = earlier_predictions(self._folder)
        for path in earlier:
            path.unlink(missing_ok=True)
        if earlier:
            rank_zero_info(
                f"Removed {len(earlier)} image(s) of an earlier predict of this checkpoint from {self._folder}"
            )

    def write_on_batch_end(
        self, trainer, pl_module, prediction: dict[str, Any], batch_indices, batch, batch_idx, dataloader_idx=0
    ) -> None:
        settings = generation_settings(pl_module, pl_module.loaded_step)
        for image, prompt, seed, index, repeat in zip(
            prediction["images"],
            prediction["prompts"],
            prediction["seeds"],
            batch["index"],
            batch["repeat"],
            strict=True,
        ):
            metadata = {"prompt": prompt, "seed": seed, **settings, "checkpoint_id": self._checkpoint}
            save_png(self._folder / f"{int(index):03d}_{int(repeat):02d}.png", image, metadata)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rank_zero_info(f"Predicted images written to {self._folder}")
