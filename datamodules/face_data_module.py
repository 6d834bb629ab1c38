"""The photos of one person with their captions for training, and prompts for validation, test and predict."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from datamodules.data_settings import (
    check_crop_and_captions,
    check_prior_settings,
    check_sizes,
    read_prompts,
    warn_of_long_prompts,
)
from datamodules.encodings import prepare_encodings
from datamodules.epoch_sampler import EpochSampler
from datamodules.face_boxes import FaceBoxes, find_faces
from datamodules.files import default_cache_dir
from datamodules.folder_scan import Pair, load_pairs
from datamodules.image_caption_dataset import Crop, ImageCaptionDataset
from datamodules.latent_cache import CacheReport


class FaceDataModule(L.LightningDataModule):
    """Photos of one person, each ``NAME.jpg|.jpeg|.png|.webp`` beside a ``NAME.txt`` caption.

    The tokenizer is the base model's: the data module takes it from the LightningModule (``model.tokenizer``)
    when the trainer sets up, or from :attr:`tokenizer` if set by hand.

    Args:
        data_dir: folder of training photos and captions.
        resolution: square training resolution.
        crop: which square of each photo trains: ``center`` (the short side resized to ``resolution``, the middle
            square), ``random`` (a random square of that, encoded live each step) or ``face`` (the square around
            the detected face, ``face_margin`` wide, never cutting the face box; photos without a face train on the
            center crop and are listed in the log).
        center_crop: deprecated: ``false`` is ``crop: random``.
        face_margin: face crop side = face box side × (1 + 2 · margin), at most the photo's short side (0.75: 2.5
            face boxes; large values give the largest square that holds the face).
        face_scale_jitter: face crop side × a random factor in [1 − jitter, 1 + jitter] per sample (never smaller
            than the face box); above 0 the crops cannot be cached, the VAE encodes each batch.
        face_detector: deepface detector for the face boxes (``dlib`` runs offline), run once per photo before
            step 1 when ``crop: face`` or the model weights the loss by the face (``model.face_loss_weight``);
            boxes are kept under ``cache_dir/face_boxes``.
        caption_template: what each sample trains on, ``{caption}`` standing for its caption file, e.g.
            ``photo of sks man, {caption}`` to bind a trigger word to the person.
        caption_dropout: probability of training a sample on the empty prompt instead (drawn from the sample's
            seed, so a resume draws the same).
        random_flip: random horizontal flip. Faces are not symmetric: off by default for identity training.
        batch_size: training batch size per device.
        num_workers: data loader worker processes; default: none when latents are cached (the loader then serves
            small tensors from memory), else up to 8 on a GPU (decoding photos off the training step) and none
            on a CPU (its cores compute the step).
        cache_latents: encode every training photo through the VAE once before step 1 (both orientations with
            ``random_flip``) and keep the latents on disk for later runs and resumes. Random crops cannot be
            cached: with ``crop: random`` or a face scale jitter the VAE encodes each batch as it trains.
        cache_dir: latent and face-box cache folder; default ``~/.cache/likeness/latents``.
        skip_bad_files: train on the good pairs and log the bad files, instead of stopping with the list.
        validation_prompts: a text file with one prompt per line, or a list of prompts.
        num_validation_prompts: how many of them (the first ones) ``fit`` and ``validate`` generate (HW: 3);
            ``None`` for all. ``test`` uses all.
        validation_batch_size: prompts generated together; default: all at once (on a GPU that runs out of
            memory, halved until it fits).
        predict_prompts: prompts for ``predict`` (file or list); default: the validation prompts.
        images_per_prompt: images per prompt in ``predict``.
        prior_prompts: regularisation prompts of prior preservation (a text file with one prompt per line, or a
            list), e.g. "a photo of a man": the class of the person, not the person. Used when
            ``model.prior_loss_weight`` > 0, which the data module then hands them to before step 1.
    """

    def __init__(
        self,
        data_dir: str = "data/train",
        resolution: int = 512,
        crop: Crop = "center",
        face_margin: float = 0.75,
        face_scale_jitter: float = 0.0,
        face_detector: str = "dlib",
        caption_template: str = "{caption}",
        caption_dropout: float = 0.0,
        random_flip: bool = False,
        batch_size: int = 1,
        num_workers: int | None = None,
        skip_bad_files: bool = False,
        validation_prompts: str | list[str] | None = None,
        num_validation_prompts: int | None = 3,
        validation_batch_size: int | None = None,
        predict_prompts: str | list[str] | None = None,
        images_per_prompt: int = 1,
        prior_prompts: str | list[str] | None = None,
        cache_latents: bool = True,
        cache_dir: str | None = None,
        center_crop: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_sizes(resolution=resolution, batch_size=batch_size, images_per_prompt=images_per_prompt)
        self.crop = check_crop_and_captions(
            crop, center_crop, face_margin, face_scale_jitter, caption_template, caption_dropout
        )
        if num_workers is not None and num_workers < 0:
            raise ValueError(f"data.num_workers {num_workers}: give 0 or more, or null for automatic.")
        if num_validation_prompts is not None and num_validation_prompts < 1:
            # 0 validated nothing without a word (no val/* curve, no best_identity.ckpt); -1 dropped the last prompt.
            raise ValueError(
                f"data.num_validation_prompts {num_validation_prompts}: give 1 or more, or null for every prompt. "
                "To validate less often, raise validation.every_n_steps (0: only before the first step and at the end)."
            )
        if validation_batch_size is not None and validation_batch_size < 1:
            raise ValueError(f"data.validation_batch_size {validation_batch_size}: give 1 or more, or null for all.")
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.pairs: list[Pair] = []
        self.train_dataset: ImageCaptionDataset | None = None
        self._resume: dict[str, int] = {}
        self._encodings_ready = False
        self.latent_cache_report: CacheReport | None = None
        self.face_report: CacheReport | None = None
        # Set by hand without a trainer; else asked of the model (`face_loss_weighted`, `latent_scale_factor`).
        self.serve_face_mask: bool | None = None
        self.latent_factor: int | None = None
        self.prior_prompt_list: list[str] = []  # what the model trains prior preservation with (empty: off)

    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate", "test"):
            self.validation_prompt_list()  # a missing or broken prompt file fails now, not at step N
        if self.tokenizer is None and self.trainer is not None:
            self.tokenizer = getattr(self.trainer.lightning_module, "tokenizer", None)
        if stage in ("fit", "validate", "test"):
            warn_of_long_prompts(
                self.tokenizer, self.validation_prompt_list(stage == "test"), "data.validation_prompts"
            )
        elif stage == "predict":
            given = self.hparams.predict_prompts is not None  # else predict takes every validation prompt
            prompts = read_prompts(self.hparams.predict_prompts, "") if given else self.validation_prompt_list(True)
            setting = "data.predict_prompts" if given else "data.validation_prompts"
            warn_of_long_prompts(self.tokenizer, prompts, setting)
        if stage == "fit" and self.train_dataset is None:
            if self.tokenizer is None:
                raise RuntimeError("FaceDataModule needs the base model's tokenizer (model.tokenizer).")
            hp, model = self.hparams, self.trainer.lightning_module if self.trainer is not None else None
            self.prior_prompt_list = self._prior_prompts_for(model)
            self.pairs = load_pairs(hp.data_dir, hp.skip_bad_files)
            face_mask = self.serve_face_mask
            if face_mask is None:
                face_mask = bool(getattr(model, "face_loss_weighted", False))
            faces = None
            if self.crop == "face" or face_mask:
                boxes = FaceBoxes(self._cache_root() / "face_boxes", hp.face_detector)
                images = [pair.image for pair in self.pairs]
                faces, self.face_report = find_faces(
                    boxes, images, *self._rank(), face_crop=self.crop == "face", face_mask=face_mask
                )
            self.train_dataset = ImageCaptionDataset(
                self.pairs,
                self.tokenizer,
                resolution=hp.resolution,
                crop=self.crop,
                random_flip=hp.random_flip,
                faces=faces,
                face_margin=hp.face_margin,
                face_scale_jitter=hp.face_scale_jitter,
                face_mask=face_mask,
                latent_factor=self.latent_factor or getattr(model, "latent_scale_factor", 8),
                caption_template=hp.caption_template,
                caption_dropout=hp.caption_dropout,
            )
            rank_zero_info(f"Training on {len(self.pairs)} image-caption pairs from {hp.data_dir}")
            world_size = self.trainer.world_size if self.trainer is not None else 1
            per_rank = -(-len(self.pairs) // world_size)
            if hp.batch_size > per_rank:
                # The loader keeps its last, short batch (drop_last=False), so every step is that one short batch.
                rank_zero_warn(
                    f"data.batch_size {hp.batch_size} is more than the {per_rank} photo(s) each device gets from "
                    f"{hp.data_dir}: every step trains on those {per_rank}. Set data.batch_size to {per_rank} or less "
                    "(or add photos) to make it say what runs."
                )

    def _prior_prompts_for(self, model: L.LightningModule | None) -> list[str]:
        """The regularisation prompts if the model trains prior preservation; a weight without prompts fails."""
        weight = float(getattr(model, "hparams", {}).get("prior_loss_weight", 0.0))
        prompts = check_prior_settings(weight, self.hparams.prior_prompts)
        if prompts and not getattr(model, "prior_preservation", False):
            rank_zero_warn(
                f"data.prior_prompts holds {len(prompts)} prompt(s), but model.prior_loss_weight is 0: they are not "
                "used. Set model.prior_loss_weight (e.g. 1.0) for prior preservation."
            )
            return []
        return prompts

    def _cache_root(self) -> Path:
        return Path(self.hparams.cache_dir).expanduser() if self.hparams.cache_dir else default_cache_dir() / "latents"

    def _rank(self) -> tuple[Any, int]:
        if self.trainer is None:
            return None, 0
        return self.trainer.strategy, self.trainer.global_rank

    @property
    def captions(self) -> list[str]:
        """Training captions as trained on, with ``caption_template`` applied (LoRA metadata: the most common
        words, kohya's tag counts, so the trigger word shows)."""
        return [self.hparams.caption_template.replace("{caption}", pair.caption) for pair in self.pairs]

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
        """Cache what the frozen encoders of ``model`` make of the training data, as far as it can be cached
        (:func:`datamodules.encodings.prepare_encodings`); rank 0 writes the latent cache, the others read it."""
        strategy, rank = self._rank()
        report = prepare_encodings(
            self.train_dataset,
            model,
            cache_latents=self.hparams.cache_latents,
            cache_root=self._cache_root(),
            prior_prompts=self.prior_prompt_list,
            strategy=strategy,
            rank=rank,
        )
        self.latent_cache_report = report or self.latent_cache_report  # None: no latents cached this time

    def prompt_loader(self, prompts: list[str], repeats: int = 1) -> DataLoader:
        items = [{"prompt": p, "index": i, "repeat": r} for i, p in enumerate(prompts) for r in range(repeats)]
        return DataLoader(items, batch_size=self.hparams.validation_batch_size or max(1, len(items)), shuffle=False)

    def validation_prompt_list(self, all_prompts: bool = False) -> list[str]:
        prompts = read_prompts(self.hparams.validation_prompts, "data.validation_prompts")
        limit = self.hparams.num_validation_prompts
        return prompts if all_prompts or limit is None else prompts[:limit]

    def val_dataloader(self) -> DataLoader | list:
        # During fit the IdentityValidation callback generates on its own schedule (every N optimizer steps);
        # Lightning's validation loop serves the `validate` subcommand, with the prompts fit validates with (a
        # checkpoint re-scored as its run scored it; `test` takes all of them).
        if self.trainer is not None and self.trainer.state.fn == "fit":
            return []
        return self.prompt_loader(self.validation_prompt_list())

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
        epoch_loop = self.trainer.fit_loop.epoch_loop
        batches = epoch_loop.batch_progress.current.processed
        if self.trainer.training and epoch_loop._should_accumulate():
            # Saved between the micro-batches of a step (a signal): the checkpoint stands for the last step's end,
            # and a resume trains the unfinished step again from its first batch (callbacks.stop_checkpoint).
            batches -= batches % self.trainer.accumulate_grad_batches
        return {"samples_done": batches * self.hparams.batch_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = dict(state_dict)
