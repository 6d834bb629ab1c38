"""``predict``: write the generated images to a folder, with prompt and seed in each PNG."""

from __future__ import annotations

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

# <prompt index>_<image index>.png, as write_on_batch_end names them.
PREDICT_NAME = re.compile(r"\d{3}_\d{2}\.png")


def generation_settings(pl_module: L.LightningModule, step: int) -> dict[str, object]:
    """How an image was generated, besides its prompt and seed: what a PNG's metadata needs to make it again."""
    hp = pl_module.hparams
    keys = {"negative_prompt": "negative_prompt", "num_inference_steps": "num_inference_steps"}
    keys |= {"guidance_scale": "guidance_scale", "base_model": "pretrained_model_name_or_path"}
    return {name: hp[key] for name, key in keys.items() if key in hp} | {"global_step": step}


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

    def folder(self, trainer: L.Trainer) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        return log_dir(trainer) / "predict" / step_folder(trainer.lightning_module.loaded_step)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Once, on every rank: trainer.log_dir is a broadcast, so asking it per image would pair up only while
        # every rank writes as many images as the others.
        self._folder = self.folder(trainer)
        if trainer.is_global_zero and self._folder.is_dir():
            self._remove_earlier_predictions()

    def _remove_earlier_predictions(self) -> None:
        """An earlier predict into this folder with more prompts or images left files the new one does not
        overwrite, which would pass for this checkpoint's: they go. A user's own files (no prompt and step in the
        PNG's text) stay."""
        for path in self._folder.iterdir():
            if not PREDICT_NAME.fullmatch(path.name):
                continue
            try:
                with Image.open(path) as old:
                    ours = {"prompt", "global_step"} <= set(getattr(old, "text", {}))
            except OSError:
                continue
            if ours:
                path.unlink(missing_ok=True)

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
            metadata = {"prompt": prompt, "seed": seed, **settings}
            save_png(self._folder / f"{int(index):03d}_{int(repeat):02d}.png", image, metadata)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rank_zero_info(f"Predicted images written to {self._folder}")
