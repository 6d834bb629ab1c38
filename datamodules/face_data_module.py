"""The photos of one person with their captions for training, and prompts for validation, test and predict."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from datamodules.epoch_sampler import EpochSampler
from datamodules.files import default_cache_dir
from datamodules.folder_scan import Pair, load_pairs
from datamodules.image_caption_dataset import ImageCaptionDataset
from datamodules.latent_cache import CacheReport, LatentCache, weights_fingerprint


def read_prompts(prompts: str | list[str] | None, setting: str) -> list[str]:
    """Prompts from a list, or from a text file with one prompt per line (blank lines ignored)."""
    if prompts is None:
        return []
    if isinstance(prompts, list):
        return [p.strip() for p in prompts if p.strip()]
    path = Path(prompts).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{setting}: prompt file {path} does not exist. Give a text file with one prompt per line, "
            "or a YAML list of prompts."
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{setting}: prompt file {path} is not UTF-8 text ({err}).") from None
    found = [line.strip().lstrip("\ufeff") for line in lines if line.strip().lstrip("\ufeff")]
    if not found:
        raise ValueError(
            f"{setting}: prompt file {path} has no prompts. Write one prompt per line, or set {setting}: null."
        )
    return found


def _check_settings(resolution: int, batch_size: int, images_per_prompt: int) -> None:
    """Settings that would fail at step 1 (or train on nothing) fail now, naming the setting."""
    if resolution < 8 or resolution % 8:
        raise ValueError(f"data.resolution {resolution}: give a positive multiple of 8 (SD1.5 was trained at 512).")
    if batch_size < 1:
        raise ValueError(f"data.batch_size {batch_size}: give 1 or more.")
    if images_per_prompt < 1:
        raise ValueError(f"data.images_per_prompt {images_per_prompt}: give 1 or more.")


class FaceDataModule(L.LightningDataModule):
    """Photos of one person, each ``NAME.jpg|.jpeg|.png|.webp`` beside a ``NAME.txt`` caption.

    The tokenizer is the base model's: the data module takes it from the LightningModule (``model.tokenizer``)
    when the trainer sets up, or from :attr:`tokenizer` if set by hand.

    Args:
        data_dir: folder of training photos and captions.
        resolution: square training resolution; the short side is resized to it, then cropped.
        center_crop: center crop (else a random crop).
        random_flip: random horizontal flip. Faces are not symmetric: off by default for identity training.
        batch_size: training batch size per device.
        num_workers: data loader worker processes; default: none when latents are cached (the loader then serves
            small tensors from memory), else up to 8 on a GPU (decoding photos off the training step) and none
            on a CPU (its cores compute the step).
        cache_latents: encode every training photo through the VAE once before step 1 (both orientations with
            ``random_flip``) and keep the latents on disk for later runs and resumes. Random crops cannot be
            cached: with ``center_crop: false`` the VAE encodes each batch as it trains.
        cache_dir: latent cache folder; default ``~/.cache/likeness/latents``.
        skip_bad_files: train on the good pairs and log the bad files, instead of stopping with the list.
        validation_prompts: a text file with one prompt per line, or a list of prompts.
        num_validation_prompts: how many of them (the first ones) to generate during ``fit`` (HW: 3);
            ``None`` for all. ``validate`` and ``test`` use all.
        validation_batch_size: prompts generated together; default: all at once (on a GPU that runs out of
            memory, halved until it fits).
        predict_prompts: prompts for ``predict`` (file or list); default: the validation prompts.
        images_per_prompt: images per prompt in ``predict``.
    """

    def __init__(
        self,
        data_dir: str = "data/train",
        resolution: int = 512,
        center_crop: bool = True,
        random_flip: bool = False,
        batch_size: int = 1,
        num_workers: int | None = None,
        skip_bad_files: bool = False,
        validation_prompts: str | list[str] | None = None,
        num_validation_prompts: int | None = 3,
        validation_batch_size: int | None = None,
        predict_prompts: str | list[str] | None = None,
        images_per_prompt: int = 1,
        cache_latents: bool = True,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        _check_settings(resolution=resolution, batch_size=batch_size, images_per_prompt=images_per_prompt)
        if num_workers is not None and num_workers < 0:
            raise ValueError(f"data.num_workers {num_workers}: give 0 or more, or null for automatic.")
        if validation_batch_size is not None and validation_batch_size < 1:
            raise ValueError(f"data.validation_batch_size {validation_batch_size}: give 1 or more, or null for all.")
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.pairs: list[Pair] = []
        self.train_dataset: ImageCaptionDataset | None = None
        self._resume: dict[str, int] = {}
        self._encodings_ready = False
        self.latent_cache_report: CacheReport | None = None

    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate", "test"):
            self.validation_prompt_list()  # a missing or broken prompt file fails now, not at step N
        if self.tokenizer is None and self.trainer is not None:
            self.tokenizer = getattr(self.trainer.lightning_module, "tokenizer", None)
        if stage == "fit" and self.train_dataset is None:
            if self.tokenizer is None:
                raise RuntimeError("FaceDataModule needs the base model's tokenizer (model.tokenizer).")
            self.pairs = load_pairs(self.hparams.data_dir, self.hparams.skip_bad_files)
            self.train_dataset = ImageCaptionDataset(
                self.pairs,
                self.tokenizer,
                resolution=self.hparams.resolution,
                center_crop=self.hparams.center_crop,
                random_flip=self.hparams.random_flip,
            )
            rank_zero_info(f"Training on {len(self.pairs)} image-caption pairs from {self.hparams.data_dir}")

    @property
    def captions(self) -> list[str]:
        """Training captions (for LoRA metadata such as the most common words)."""
        return [pair.caption for pair in self.pairs]

    def train_dataloader(self) -> DataLoader:
        assert self.train_dataset is not None
        if not self._encodings_ready and self.trainer is not None:
            # Here, not in setup: the model is on its device now, and Lightning asks for the loader before step 1.
            self.prepare_encodings(self.trainer.lightning_module)
            self._encodings_ready = True
        num_workers = self.hparams.num_workers
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        if num_workers is None:
            cached = self.train_dataset.latents is not None
            num_workers = 0 if cached or not on_gpu else min(8, max(1, (os.cpu_count() or 2) - 1))
        world_size = self.trainer.world_size if self.trainer is not None else 1
        rank = self.trainer.global_rank if self.trainer is not None else 0
        sampler = EpochSampler(
            len(self.train_dataset),
            seed=int(os.environ.get("PL_GLOBAL_SEED", 0)),
            rank=rank,
            world_size=world_size,
        )
        samples_done = self._resume.pop("samples_done", 0)
        if 0 < samples_done < len(sampler):
            sampler.skip = samples_done
        return DataLoader(
            self.train_dataset,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            pin_memory=on_gpu,
            drop_last=False,
        )

    def prepare_encodings(self, model: L.LightningModule) -> None:
        """Cache what the frozen encoders of ``model`` make of the training data, as far as it can be cached.

        Latents (the VAE's moments) when ``cache_latents`` and center crop; the text encoder's hidden states when
        ``model.text_encoder_frozen``. ``model`` gives ``vae``, ``latent_moments(pixels)`` and
        ``encode_prompts(input_ids)``. Rank 0 encodes and writes the latent cache; the other ranks read it.
        """
        dataset, hp = self.train_dataset, self.hparams
        if hp.cache_latents and not hp.center_crop:
            rank_zero_info(
                "data.center_crop is false: random crops cannot be cached, so the VAE encodes every batch as it "
                "trains (set data.center_crop: true to train from cached latents)."
            )
        elif hp.cache_latents and hasattr(model, "latent_moments"):
            vae = model.vae
            cache = LatentCache(
                Path(hp.cache_dir).expanduser() if hp.cache_dir else default_cache_dir() / "latents",
                weights_fingerprint(vae.encoder, vae.quant_conv),
                hp.resolution,
            )
            flips = (False, True) if hp.random_flip else (False,)
            strategy = self.trainer.strategy if self.trainer is not None else None
            rank = self.trainer.global_rank if self.trainer is not None else 0
            if strategy is not None and rank != 0:
                strategy.barrier()  # rank 0 writes the entries first
            images = [pair.image for pair in self.pairs]
            dataset.latents, report = cache.fill(
                images, flips, dataset.pixels, model.latent_moments, progress=rank == 0
            )
            if strategy is not None and rank == 0:
                strategy.barrier()
            self.latent_cache_report = report
            rank_zero_info(
                f"Latent cache {cache.folder}: {report.reused} entries reused, {report.encoded} encoded"
                + (f" ({report.rebuilt} corrupt ones rebuilt)" if report.rebuilt else "")
                + "; the VAE encoder does not run during training."
            )
        if getattr(model, "text_encoder_frozen", False):
            ids = dataset.input_ids
            dataset.hidden_states = torch.cat(
                [model.encode_prompts(ids[i : i + 32]).float().cpu() for i in range(0, len(ids), 32)]
            )
            rank_zero_info(f"Text encoder frozen: embeddings of the {len(ids)} captions computed once.")

    def prompt_loader(self, prompts: list[str], repeats: int = 1) -> DataLoader:
        items = [{"prompt": p, "index": i, "repeat": r} for i, p in enumerate(prompts) for r in range(repeats)]
        return DataLoader(items, batch_size=self.hparams.validation_batch_size or max(1, len(items)), shuffle=False)

    def validation_prompt_list(self, all_prompts: bool = False) -> list[str]:
        prompts = read_prompts(self.hparams.validation_prompts, "data.validation_prompts")
        limit = self.hparams.num_validation_prompts
        return prompts if all_prompts or limit is None else prompts[:limit]

    def val_dataloader(self) -> DataLoader | list:
        # During fit the IdentityValidation callback generates on its own schedule (every N optimizer steps);
        # Lightning's validation loop serves the `validate` subcommand, with all prompts.
        if self.trainer is not None and self.trainer.state.fn == "fit":
            return []
        return self.prompt_loader(self.validation_prompt_list(all_prompts=True))

    def test_dataloader(self) -> DataLoader:
        prompts = self.validation_prompt_list(all_prompts=True)
        if not prompts:
            raise ValueError("test needs prompts: set data.validation_prompts to a file or a list of prompts.")
        return self.prompt_loader(prompts)

    def predict_dataloader(self) -> DataLoader:
        prompts = read_prompts(self.hparams.predict_prompts, "data.predict_prompts") or self.validation_prompt_list(
            all_prompts=True
        )
        if not prompts:
            raise ValueError("predict needs prompts: set data.predict_prompts (or data.validation_prompts).")
        return self.prompt_loader(prompts, repeats=self.hparams.images_per_prompt)

    def state_dict(self) -> dict[str, Any]:
        # How far into the epoch training got, so that a resumed run skips those batches (see EpochSampler).
        if self.trainer is None:
            return {}
        # In samples, so that a resume with another batch size still skips exactly what was trained on.
        batches = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"samples_done": batches * self.hparams.batch_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = dict(state_dict)
