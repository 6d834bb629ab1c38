"""Generate the validation prompts every N steps and log how much the pictures look like the person."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from callbacks.export_facts import step_folder
from callbacks.image_writer import generation_settings
from callbacks.interruptible import Interruptible
from callbacks.lora_ema import ema_weights
from callbacks.prompt_grid import prompt_grid, save_images
from callbacks.run_folders import checkpoint_dir, log_dir
from callbacks.stop_checkpoint import arm_signal_handlers
from datamodules.files import default_cache_dir
from datamodules.folder_scan import load_pairs
from datamodules.image_caption_dataset import load_rgb
from metrics.face_model import FaceModel
from metrics.identity_scorer import HW_MAX_FACELESS, HW_PROMPTS, IdentityScorer, IdentityScores
from metrics.score_files import ScoreFiles


class IdentityValidation(L.Callback):
    """Face distance, identity match rate, CLIP score and faceless count of images generated with the model.

    During ``fit`` it generates one image per validation prompt (the data module's first
    ``num_validation_prompts``) every ``every_n_steps`` optimizer steps, with a fixed seed per prompt, using the
    in-memory LoRA model; modules' train/eval modes and the RNG state are restored afterwards, so validation
    does not change the training trajectory. ``validate`` and ``test`` score all prompts; ``test`` writes
    ``valid_image_<i>.png`` as the HW did and prints the HW's numbers.

    Each generated face is the person or not by the face model's own verification threshold (see
    ``IdentityMatch``); ``identity_match_rate`` is the share of images that are the person, faceless ones
    counting as not. HW rubric points are given only with the rubric's face model, GhostFaceNet.

    Args:
        every_n_steps: validate every this many optimizer steps (0: only baseline and end).
        baseline: validate before the first step, to see where training starts from.
        at_end: validate after the last step.
        face_model: DeepFace recognition model (``Dlib`` or ``SFace`` offline; the HW used ``GhostFaceNet``).
        face_detector: DeepFace detector backend (``dlib`` with Dlib, ``yunet`` with SFace; the HW used ``ssd``).
        clip_model: CLIP Hub id or local folder for the CLIP score; ``null`` skips it.
        min_clip_score: HW floor for the best checkpoint: CLIP score above this.
        max_faceless_fraction: HW floor: at most this fraction of images faceless (5 of 25).
        save_best: keep ``best_identity.ckpt``: the best validation (by ``best_by``) among those passing the
            floors.
        best_by: what makes a validation the best: ``face_distance`` (lowest; the HW's grade) or
            ``identity_match_rate`` (highest share of images that are the person; ties go to the lower face
            distance).
        cache_dir: where training-photo embeddings are cached (keyed by files and face model).
        include_faceless_references: training photos in which no face is found still count, with DeepFace's
            whole-image embedding, as in the HW's grading; ``false`` leaves them out.
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        baseline: bool = True,
        at_end: bool = True,
        face_model: str = "Dlib",
        face_detector: str = "dlib",
        clip_model: str | None = "openai/clip-vit-base-patch32",
        min_clip_score: float = 22.0,
        max_faceless_fraction: float = HW_MAX_FACELESS / HW_PROMPTS,
        save_best: bool = True,
        best_by: Literal["face_distance", "identity_match_rate"] = "face_distance",
        cache_dir: str | None = None,
        include_faceless_references: bool = True,
    ) -> None:
        self.every_n_steps = every_n_steps
        self.baseline = baseline
        self.at_end = at_end
        self.face_model = face_model
        self.face_detector = face_detector
        self.clip_model = clip_model
        self.min_clip_score = min_clip_score
        self.max_faceless_fraction = max_faceless_fraction
        self.save_best = save_best
        if best_by not in ("face_distance", "identity_match_rate"):
            raise ValueError(
                f"IdentityValidation: best_by must be face_distance or identity_match_rate, not {best_by!r}."
            )
        self.best_by = best_by
        self.cache_dir = cache_dir or str(default_cache_dir())
        self.include_faceless_references = include_faceless_references
        self.scorer: IdentityScorer | None = None
        self._pairs: list = []
        # The best validation so far (both numbers, whatever ranks them: a resume may change best_by).
        self.best_face_distance = math.inf
        self.best_identity_match_rate = -math.inf
        self.last_step = -1
        self.last_metrics: dict[str, float] = {}
        self._outputs: list[dict[str, Any]] = []

    # --- set-up: everything that can fail, fails before training ----------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "predict" or self.scorer is not None:
            return
        datamodule = trainer.datamodule
        # During fit the data module has read and checked the folder already (its setup runs first).
        pairs = datamodule.pairs or load_pairs(datamodule.hparams.data_dir, datamodule.hparams.skip_bad_files)
        self.scorer = IdentityScorer(
            FaceModel(self.face_model, self.face_detector),
            [pair.image for pair in pairs],
            Path(self.cache_dir) / "face_embeddings",
            self.clip_model,
            include_faceless=self.include_faceless_references,
        )
        self._pairs = pairs

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0:
            self._log_reference(trainer)

    @rank_zero_only
    def _log_reference(self, trainer: L.Trainer) -> None:
        # The training photos scored like generated ones: the best a run can hope for on this data set.
        images = [load_rgb(pair.image) for pair in self._pairs]  # upright, 8-bit RGB: as training sees them
        scores = self.scorer.score(images, [pair.caption for pair in self._pairs])
        self._log(trainer, scores.as_metrics("reference"), 0)
        rank_zero_info(f"Training photos against themselves: {scores.summary()}")

    # --- during fit ---------------------------------------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.baseline and trainer.global_step == 0:
            arm_signal_handlers(trainer)  # StopCheckpoint's own on_train_start comes after this one
            self._validate_during_fit(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self.last_step:
            self._validate_during_fit(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_end and trainer.global_step != self.last_step:
            self._validate_during_fit(trainer, pl_module)

    def _validate_during_fit(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.last_step = trainer.global_step
        prompts = trainer.datamodule.validation_prompt_list()
        if not prompts:
            return
        better = self._generate_and_score(trainer, pl_module, prompts)
        # Every rank must take part in saving a checkpoint; rank 0 decided.
        if self.save_best and trainer.strategy.broadcast(better, src=0):
            trainer.save_checkpoint(checkpoint_dir(trainer) / "best_identity.ckpt")

    def _generate_and_score(self, trainer: L.Trainer, pl_module: L.LightningModule, prompts: list[str]) -> bool:
        run_dir = log_dir(trainer)  # on every rank: trainer.log_dir is a broadcast (see _report)
        if not trainer.is_global_zero:
            # Rank 0 alone scores, so it alone generates (nothing in generation talks to the other ranks, which
            # wait for its decision at the broadcast): N GPUs validate in one GPU's time, not N times the work.
            return False
        if trainer.received_sigterm:  # a signal in the step before: the checkpoint comes first, not a validation
            rank_zero_info(f"Validation at step {trainer.global_step} skipped: stopping (a signal came).")
            return False
        started = time.perf_counter()
        # The first Ctrl+C or SIGTERM stops the generating, so that the checkpoint comes now, not minutes later. The
        # EMA swap stays outside: cut short there, the live weights would be lost to the checkpoint. Scoring and
        # writing the images, seconds, are left to finish.
        with ema_weights(trainer), Interruptible() as work:  # EMA weights if ema.decay is set, as best_identity.ckpt
            outputs = generate_restoring_state(pl_module, trainer.datamodule.prompt_loader(prompts))
        if work.interrupted:
            return False
        return bool(self._report(trainer, outputs, "val", time.perf_counter() - started, run_dir))

    @rank_zero_only
    def _report(
        self,
        trainer: L.Trainer,
        outputs: list[dict[str, Any]],
        stage: str,
        seconds_generate: float,
        run_dir: Path,
        step: int | None = None,
    ) -> bool:
        """Score, save (images, scores.json, scores.csv, grid.png), log and print one validation.

        ``step`` defaults to the trainer's (fit); ``seconds_generate`` is how long generating took, so that
        ``<stage>/seconds`` is the whole validation: generating, scoring and saving (issue #11).
        ``run_dir`` comes from the caller, on every rank: ``trainer.log_dir`` is a collective (a broadcast), and
        calling it here, on rank 0 alone, paired it with another rank's next broadcast (a DDP deadlock, issue #8).
        """
        started = time.perf_counter()
        images = [im for out in outputs for im in out["images"]]
        prompts = [p for out in outputs for p in out["prompts"]]
        seeds = [s for out in outputs for s in out.get("seeds", [])]
        scores = self.scorer.score(images, prompts)
        step = trainer.global_step if step is None else step
        # Each validation, and each checkpoint tested, in its own step folder: a second test does not overwrite.
        folder = run_dir / ("validation" if stage == "val" else stage) / step_folder(step)
        settings = generation_settings(trainer.lightning_module, step)
        names = save_images(folder, images, prompts, stage, seeds if len(seeds) == len(images) else None, settings)
        grid = prompt_grid(images, prompts, scores.labels(), scores.matches)
        scores.seconds = {"generate": seconds_generate, **scores.seconds}
        scores.seconds["total"] = seconds_generate + time.perf_counter() - started
        ScoreFiles(folder).write(scores, names, prompts, self._settings(trainer, stage, run_dir, step), grid)
        seconds = {f"{stage}/seconds_{part}": scores.seconds[part] for part in ("generate", "face", "clip")}
        metrics = scores.as_metrics(stage) | seconds | {f"{stage}/seconds": scores.seconds["total"]}
        self.last_metrics = metrics
        self._log(trainer, metrics, step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(f"{stage}/images", np.asarray(grid), step, dataformats="HWC")
        rank_zero_info(
            f"[{stage} step {step}] {scores.summary()} ({scores.seconds['total']:.1f}s; images, scores.json and "
            f"scores.csv in {folder})"
        )
        better = self.is_better(scores)
        if better:
            self.best_face_distance = scores.face_distance
            self.best_identity_match_rate = scores.identity_match_rate
        return better

    def _settings(self, trainer: L.Trainer, stage: str, run_dir: Path, step: int) -> dict[str, Any]:
        """What scores.json records about how this validation was scored."""
        hparams = getattr(trainer.datamodule, "hparams", {})
        return {
            "photos": str(hparams.get("data_dir", "")),
            "prompts": hparams.get("validation_prompts"),  # a file, or the config's list of prompts
            **self.scorer.settings,
            "scored": {"stage": stage, "run": str(run_dir), "step": step},
        }

    def is_better(self, scores: IdentityScores) -> bool:
        """Whether ``scores`` pass the floors and beat the best validation so far, ranked by ``best_by``."""
        if not scores.passes(self.min_clip_score, self.max_faceless_fraction):
            return False
        # The rate moves in steps of 1/images, so ties are common: the face distance breaks them.
        if self.best_by == "identity_match_rate" and scores.identity_match_rate != self.best_identity_match_rate:
            return scores.identity_match_rate > self.best_identity_match_rate
        return scores.face_distance < self.best_face_distance

    @staticmethod
    def _log(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    # --- validate and test subcommands (Lightning's loops call the module's *_step) ----------------------------

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._outputs, self._started = [], time.perf_counter()

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._outputs.append(outputs)

    on_test_batch_end = on_validation_batch_end

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and self._outputs:
            # `validate` of a checkpoint writes into its run: its own folder and tags, beside fit's validation/
            # and val/* (which it would overwrite, and add a second point at that step to each curve).
            stage = "validate" if trainer.validating else "test"
            seconds = time.perf_counter() - self._started
            self._report(trainer, self._outputs, stage, seconds, log_dir(trainer), pl_module.loaded_step)
        self._outputs = []

    on_test_epoch_end = on_validation_epoch_end

    def state_dict(self) -> dict[str, Any]:
        # last_metrics: for model cards written later from the checkpoint (likeness export).
        return {
            "best_face_distance": self.best_face_distance,
            "best_identity_match_rate": self.best_identity_match_rate,
            "last_step": self.last_step,
            "last_metrics": self.last_metrics,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_face_distance = state_dict["best_face_distance"]
        # Checkpoints from before the match rate: unknown, so the next passing validation may take over.
        self.best_identity_match_rate = state_dict.get("best_identity_match_rate", -math.inf)
        self.last_step = state_dict["last_step"]
        self.last_metrics = state_dict.get("last_metrics", {})


def generate_restoring_state(pl_module: L.LightningModule, loader) -> list[dict[str, Any]]:
    """Generate every batch of prompts in eval mode, then restore each module's mode and every RNG."""
    modes = {module: module.training for module in pl_module.modules()}
    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        pl_module.eval()
        with torch.no_grad():
            outputs = []
            for batch in loader:
                with Interruptible.region():  # a signal stops here; the restore below always runs whole
                    outputs.append(pl_module.generate_batch(batch))
            return outputs
    finally:
        for module, training in modes.items():
            module.train(training)
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
