"""The photos of one person with their captions for training, and prompts for validation, test and predict."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, get_args

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from datamodules.epoch_sampler import EpochSampler
from datamodules.face_boxes import FaceBoxes, PhotoFace
from datamodules.files import default_cache_dir
from datamodules.folder_scan import Pair, load_pairs
from datamodules.image_caption_dataset import Crop, ImageCaptionDataset
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
        num_validation_prompts: how many of them (the first ones) to generate during ``fit`` (HW: 3);
            ``None`` for all. ``validate`` and ``test`` use all.
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
        _check_settings(resolution=resolution, batch_size=batch_size, images_per_prompt=images_per_prompt)
        self.crop = check_crop_and_captions(
            crop, center_crop, face_margin, face_scale_jitter, caption_template, caption_dropout
        )
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
        if stage == "fit" and self.train_dataset is None:
            if self.tokenizer is None:
                raise RuntimeError("FaceDataModule needs the base model's tokenizer (model.tokenizer).")
            hp, model = self.hparams, self.trainer.lightning_module if self.trainer is not None else None
            self.prior_prompt_list = self._prior_prompts_for(model)
            self.pairs = load_pairs(hp.data_dir, hp.skip_bad_files)
            face_mask = self.serve_face_mask
            if face_mask is None:
                face_mask = bool(getattr(model, "face_loss_weighted", False))
            self.train_dataset = ImageCaptionDataset(
                self.pairs,
                self.tokenizer,
                resolution=hp.resolution,
                crop=self.crop,
                random_flip=hp.random_flip,
                faces=self.find_faces(face_mask) if self.crop == "face" or face_mask else None,
                face_margin=hp.face_margin,
                face_scale_jitter=hp.face_scale_jitter,
                face_mask=face_mask,
                latent_factor=self.latent_factor or getattr(model, "latent_scale_factor", 8),
                caption_template=hp.caption_template,
                caption_dropout=hp.caption_dropout,
            )
            rank_zero_info(f"Training on {len(self.pairs)} image-caption pairs from {hp.data_dir}")

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

    def find_faces(self, face_mask: bool = False) -> list[PhotoFace]:
        """Every training photo's face box, from the face-box cache or detected now (rank 0; the others read)."""
        hp = self.hparams
        boxes = FaceBoxes(self._cache_root() / "face_boxes", hp.face_detector)
        strategy, rank = self._rank()
        if strategy is not None and rank != 0:
            strategy.barrier()  # rank 0 detects and writes the entries first
        faces, self.face_report = boxes.find([pair.image for pair in self.pairs], progress=rank == 0)
        if strategy is not None and rank == 0:
            strategy.barrier()
        found = sum(face.box is not None for face in faces)
        rank_zero_info(
            f"Faces ({hp.face_detector}) found in {found} of {len(faces)} photos ({self.face_report.reused} from "
            f"{boxes.folder}, {self.face_report.encoded} detected now)."
        )
        faceless = [pair.image.name for pair, face in zip(self.pairs, faces, strict=True) if face.box is None]
        if faceless:
            uses = [
                what for what, used in (("the center crop", self.crop == "face"), ("an even loss", face_mask)) if used
            ]
            rank_zero_warn(
                f"No face found in {len(faceless)} photo(s); they train on {' and '.join(uses)}: {', '.join(faceless)}"
            )
        cut = [pair.image.name for pair, face in zip(self.pairs, faces, strict=True) if face.box and not face.fits]
        if cut and self.crop == "face":
            rank_zero_warn(
                f"The face box is wider or taller than the short side in {len(cut)} photo(s), so their square crop "
                f"cuts it: {', '.join(cut)}"
            )
        return faces

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
        """Cache what the frozen encoders of ``model`` make of the training data, as far as it can be cached.

        Latents (the VAE's moments) when ``cache_latents`` and the crops never change (center, or face without
        jitter); the text encoder's hidden states of the captions and the empty prompt when
        ``model.text_encoder_frozen``; the base text encoder's view of the regularisation prompts when the model
        trains prior preservation (``model.use_prior_prompts``). ``model`` gives ``vae``, ``latent_moments(pixels)``
        and ``encode_prompts(input_ids)``. Rank 0 encodes and writes the latent cache; the other ranks read it.
        """
        dataset, hp = self.train_dataset, self.hparams
        if hp.cache_latents and not dataset.cacheable:
            why = "random crops" if self.crop == "random" else "face crops with data.face_scale_jitter > 0"
            rank_zero_info(
                f"{why.capitalize()} cannot be cached, so the VAE encodes every batch as it trains (data.crop center, "
                "or face without jitter, trains from cached latents)."
            )
        elif hp.cache_latents and hasattr(model, "latent_moments"):
            vae = model.vae
            cache = LatentCache(self._cache_root(), weights_fingerprint(vae.encoder, vae.quant_conv), hp.resolution)
            flips = (False, True) if hp.random_flip else (False,)
            strategy, rank = self._rank()
            if strategy is not None and rank != 0:
                strategy.barrier()  # rank 0 writes the entries first
            images = [pair.image for pair in self.pairs]
            crops = [dataset.crop_key(i) for i in range(len(dataset))]
            dataset.latents, report = cache.fill(
                images, flips, dataset.pixels, model.latent_moments, progress=rank == 0, crops=crops
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
            if hp.caption_dropout:  # dropped captions train on the empty prompt
                dataset.empty_hidden_state = model.encode_prompts(dataset.empty_input_ids[None]).float().cpu()[0]
            rank_zero_info(f"Text encoder frozen: embeddings of the {len(ids)} captions computed once.")
        if self.prior_prompt_list:
            model.use_prior_prompts(self.prior_prompt_list)
            rank_zero_info(
                f"Prior preservation: {len(self.prior_prompt_list)} regularisation prompt(s), weight "
                f"{model.hparams.prior_loss_weight}; the base model's view of them computed once. Each step runs the "
                "UNet on twice the batch, and once more without gradient for the base model's prediction."
            )

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
