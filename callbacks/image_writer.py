"""``predict``: write the generated images to a folder, with prompt and seed in each PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from callbacks.export_facts import step_folder
from callbacks.prompt_grid import save_png
from callbacks.run_folders import log_dir


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

    def write_on_batch_end(
        self, trainer, pl_module, prediction: dict[str, Any], batch_indices, batch, batch_idx, dataloader_idx=0
    ) -> None:
        hp = pl_module.hparams
        for image, prompt, seed, index, repeat in zip(
            prediction["images"],
            prediction["prompts"],
            prediction["seeds"],
            batch["index"],
            batch["repeat"],
            strict=True,
        ):
            metadata = {
                "prompt": prompt,
                "seed": seed,
                "negative_prompt": hp.negative_prompt,
                "num_inference_steps": hp.num_inference_steps,
                "guidance_scale": hp.guidance_scale,
                "base_model": hp.pretrained_model_name_or_path,
                "global_step": pl_module.loaded_step,
            }
            save_png(self._folder / f"{int(index):03d}_{int(repeat):02d}.png", image, metadata)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rank_zero_info(f"Predicted images written to {self._folder}")
