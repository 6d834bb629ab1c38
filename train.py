"""likeness: train a face LoRA for Stable Diffusion 1.x and watch identity metrics while it trains.

likeness fit --config configs/brad.yaml                                 # or: python train.py fit ...
likeness fit --config configs/brad.yaml --ckpt_path last                # resume the newest run
likeness test --config configs/brad.yaml --ckpt_path CKPT
likeness fit --help
"""

from __future__ import annotations

# isort: off
# First: importing it quiets what the libraries below print while they are imported (issue #10).
from likeness_command import LikenessParser, cli, reported_errors
# isort: on

import warnings
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_warn

from callbacks.atomic_checkpoint_io import AtomicCheckpointIO
from callbacks.identity_validation import IdentityValidation
from callbacks.image_writer import ImageWriter
from callbacks.lora_ema import LoraEMA
from callbacks.lora_export import LoraExport
from callbacks.non_finite_guard import NonFiniteGuard
from callbacks.run_folders import (
    PATH_SETTINGS,
    DropEmptyRun,
    absolute_path_settings,
    absolute_setting,
    resolve_checkpoint,
    run_folder_of,
)
from callbacks.step_progress import StepProgressBar
from callbacks.stop_checkpoint import StopCheckpoint
from callbacks.training_crops import TrainingCrops
from datamodules.face_data_module import FaceDataModule
from datamodules.files import cannot_write, default_cache_dir
from lightning_modules.finite import check_finite
from lightning_modules.lora_diffusion import LoRADiffusion

# Settings that decide which tensors the LoRA has or what they mean: a checkpoint trained with other values
# cannot be continued with these, so a resume that changes them stops with an error.
STRUCTURAL_SETTINGS = (
    "lora_rank",
    "lora_alpha",
    "unet_target_modules",
    "train_text_encoder",
    "text_encoder_target_modules",
)  # and the optimizer class: its saved state belongs to that class


def _plain(value: Any) -> Any:
    """A config value as plain data (jsonargparse Namespaces and tuples vs. the checkpoint's dicts and lists)."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _class_path(value: Any) -> Any:
    return _plain(value).get("class_path") if isinstance(_plain(value), dict) else value


def _runs_folder(trainer_config: Any) -> Path:
    """``<save_dir>/<name>`` of the configured logger (where the run folders ``version_N`` are)."""
    logger = _plain(trainer_config.get("logger"))
    init = logger.get("init_args", {}) if isinstance(logger, dict) else {}
    return Path(init.get("save_dir") or "logs") / str(init.get("name") or "likeness")


def _check_before_loading(subcommand: str, config: Namespace) -> None:
    """Mistakes found in seconds, before the base model loads for a minute (issue #10): the photo folder, the prompt
    files, crop and caption settings, the CLIP and face models, and an 8-bit optimizer on a machine that cannot run
    it (issue #9)."""
    from datamodules.data_settings import check_crop_and_captions, check_prior_settings, read_prompts
    from datamodules.folder_scan import load_pairs

    data = config["data"]
    crop_settings = ("crop", "center_crop", "face_margin", "face_scale_jitter", "caption_template", "caption_dropout")
    with warnings.catch_warnings():  # a deprecation warning comes once, from the data module
        warnings.simplefilter("ignore")
        check_crop_and_captions(**{key: _plain(data[key]) for key in crop_settings})
    if subcommand == "fit":
        with warnings.catch_warnings():  # skipped files are reported once, when the data module sets up
            warnings.simplefilter("ignore")
            load_pairs(data["data_dir"], data["skip_bad_files"])
    if subcommand in ("fit", "validate", "test"):
        read_prompts(_plain(data["validation_prompts"]), "data.validation_prompts")
    if subcommand == "fit":
        check_prior_settings(float(config["model"].get("prior_loss_weight") or 0.0), _plain(data.get("prior_prompts")))
    if subcommand == "predict" and data.get("predict_prompts") is not None:
        read_prompts(_plain(data["predict_prompts"]), "data.predict_prompts")
    for section, given, default in (
        ("data", data.get("cache_dir"), default_cache_dir() / "latents"),
        ("validation", (config.get("validation") or {}).get("cache_dir"), default_cache_dir()),
    ):
        folder = Path(given).expanduser() if given else default
        if subcommand == "fit" and (reason := cannot_write(folder)):
            setting = f"{section}.cache_dir {given}" if given else f"the cache folder {folder} ({section}.cache_dir)"
            raise ValueError(f"{setting}: cannot write there ({reason}). Give a folder you can write to.")
    model = config["model"]
    face_weighted = model.get("face_loss_weight") != model.get("background_loss_weight")
    if subcommand == "fit" and (data.get("crop") == "face" or face_weighted):
        # The detector that finds the face boxes (data.face_detector), checked as the scoring models are below.
        from datamodules.face_boxes import DETECTOR_SETTING
        from metrics.face_model import FaceModel

        FaceModel("Dlib", data["face_detector"], detector_setting=DETECTOR_SETTING).check()
    validation = config.get("validation")
    if subcommand in ("fit", "validate", "test") and validation is not None:
        # The scoring models, before the base model loads: offline, a missing one stops here in seconds (#11).
        from metrics.clip_score import check_clip_available
        from metrics.face_model import FaceModel

        if validation.get("clip_model"):
            check_clip_available(validation["clip_model"])
        FaceModel(validation["face_model"], validation["face_detector"]).check()
    optimizer = str(_class_path(config["model"].get("optimizer")) or "")
    if optimizer.startswith("bitsandbytes."):
        accelerator = str(config["trainer"].get("accelerator") or "auto")
        on_cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
        if not on_cuda:
            raise ValueError(
                f"model.optimizer {optimizer}: bitsandbytes' 8-bit optimizers run on CUDA GPUs only, and this run "
                f"trains on the CPU (trainer.accelerator {accelerator}). Use torch.optim.AdamW here; keep the 8-bit "
                "optimizer for a GPU with little memory."
            )


class RunConfig(SaveConfigCallback):
    """``config.yaml`` for ``fit``; ``config_<command>.yaml`` for the commands that write into a trained run's folder
    (its training config stays as it was)."""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        stage = getattr(stage, "value", stage)  # Lightning passes a TrainerFn
        if stage != "fit":
            self.config_filename = f"config_{stage}.yaml"
        super().setup(trainer, pl_module, stage)


class LikenessCLI(LightningCLI):
    """LightningCLI with the project's model and data, checkpoints and LR monitor always on.

    On ``--ckpt_path`` the run's own config wins (unlike LightningCLI >= 2.5.5, which merges the checkpoint's
    hyperparameters over it): a setting changed on resume (learning rate schedule, min-SNR, validation...) takes
    effect from the resumed step on and is reported; changing a setting that shapes the LoRA tensors
    (:data:`STRUCTURAL_SETTINGS`) is an error.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.every_n_train_steps": 500,
                "checkpoint.save_top_k": -1,
                "checkpoint.filename": "step{step:06d}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(NonFiniteGuard, "nan_guard")
        # Before validation and export, which use its EMA weights (they would catch it up anyway).
        parser.add_lightning_class_args(LoraEMA, "ema")
        parser.add_lightning_class_args(IdentityValidation, "validation")
        parser.add_lightning_class_args(ImageWriter, "predict_writer")
        parser.add_lightning_class_args(LoraExport, "export")
        parser.add_lightning_class_args(TrainingCrops, "training_crops")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        # After validation and export: the last.ckpt saved at the end holds the final validation's metrics.
        parser.add_lightning_class_args(StopCheckpoint, "stop_checkpoint")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        if subcommand := self.config.get("subcommand"):
            absolute_path_settings(self.config[subcommand])

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not ckpt_path:
            return
        ckpt_path = str(resolve_checkpoint(str(ckpt_path), _runs_folder(self.config[subcommand]["trainer"])))
        self.config[subcommand]["ckpt_path"] = ckpt_path
        try:
            checkpoint = torch.load(ckpt_path, weights_only=True, map_location="cpu")
        except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
            raise ValueError(
                f"--ckpt_path {ckpt_path} is not a likeness checkpoint ({type(err).__name__}). Give a .ckpt file "
                "from a run's checkpoints/ folder (exported LoRA .safetensors files cannot be resumed)."
            ) from None
        hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
        if not isinstance(hparams, dict) or "pretrained_model_name_or_path" not in hparams:
            # An SD model file has a state_dict and often a global_step (840000): without this, "raise max_steps".
            raise ValueError(
                f"--ckpt_path {ckpt_path} is not a checkpoint of a likeness run (no LoRADiffusion settings in it). "
                "To resume, give a .ckpt from a run's checkpoints/ folder; to train on a base model file, give it "
                "as --model.pretrained_model_name_or_path."
            )
        check_finite(
            checkpoint.get("state_dict", {}),
            f"--ckpt_path {ckpt_path}",
            "Its LoRA weights are unusable (a diverged run, or a damaged file): use an earlier checkpoint.",
        )
        max_steps = self.config[subcommand]["trainer"].get("max_steps")
        step = int(checkpoint.get("global_step", 0))
        if subcommand == "fit" and max_steps is not None and 0 <= max_steps <= step:
            raise ValueError(
                f"--ckpt_path {ckpt_path} is at step {step} and trainer.max_steps is {max_steps}: nothing is left to "
                "train. To train on, raise --trainer.max_steps (the learning-rate schedule then spans the new "
                "length; a warning shows how the rate changes)."
            )
        conflicts, changes = [], []
        for section, saved in (
            ("model", checkpoint.get("hyper_parameters", {})),
            ("data", checkpoint.get("datamodule_hyper_parameters", {})),
        ):
            current = self.config[subcommand][section]
            for key, old in saved.items():
                new = _plain(current.get(key))
                if key in PATH_SETTINGS[section]:  # saved relative by older versions
                    old = absolute_setting(key, old)
                if key.startswith("_") or key not in current or _plain(old) == new:
                    continue
                line = f"{section}.{key}: checkpoint {old!r}, config {new!r}"
                structural = section == "model" and (
                    key in STRUCTURAL_SETTINGS or (key == "optimizer" and _class_path(old) != _class_path(new))
                )
                (conflicts if structural else changes).append(line)
        if conflicts:
            raise ValueError(
                f"The checkpoint {ckpt_path} was trained with other LoRA settings:\n  "
                + "\n  ".join(conflicts)
                + "\nUse the config it was trained with (its copy is config.yaml in the run's log folder)."
            )
        if changes and subcommand == "fit":  # test/predict with other prompts or data settings is the point
            rank_zero_warn(
                "Settings differ from the checkpoint; the config's values apply from the resumed step on:\n  "
                + "\n  ".join(changes)
            )

    def before_instantiate_classes(self) -> None:
        """Check what is quick to check before the base model loads; validate/test/predict of a checkpoint log and
        write into the run it comes from, not a new version_N."""
        subcommand = self.config.get("subcommand")
        if subcommand:
            _check_before_loading(subcommand, self.config[subcommand])
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        logger = self.config[subcommand]["trainer"].get("logger") if ckpt_path else None
        if subcommand == "fit" or not isinstance(logger, Namespace | dict) or "init_args" not in logger:
            return
        run = run_folder_of(Path(ckpt_path))
        logger["init_args"]["save_dir"], logger["init_args"]["name"] = str(run.parent), ""
        logger["init_args"]["version"] = run.name

    def instantiate_trainer(self, **kwargs: Any):
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # keep a checkpoint_io the user chose
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        logger_dir = getattr(trainer.logger, "log_dir", None)
        trainer.callbacks.append(DropEmptyRun(Path(logger_dir) if logger_dir else None))
        default_bar = trainer.progress_bar_callback
        if type(default_bar) in (RichProgressBar, TQDMProgressBar):  # Lightning's own (a user's bar stays)
            # First, so that its step clock stops before validation and checkpoints run in the same hook.
            trainer.callbacks.remove(default_bar)
            trainer.callbacks.insert(0, StepProgressBar())
        return trainer


class _Parsed(Exception):  # a signal that parsing is done, not an error
    def __init__(self, config: Namespace) -> None:
        super().__init__("parsed")
        self.config = config


class _ParseOnlyCLI(LikenessCLI):
    """Reads and checks the settings like ``fit`` and stops before anything is built (``likeness prefetch``)."""

    def before_instantiate_classes(self) -> None:
        raise _Parsed(self.config[self.config["subcommand"]])


def _cli(cli_class: type[LikenessCLI], args: list[str] | None) -> LikenessCLI:
    torch.set_float32_matmul_precision("high")
    # FaceDataModule's EpochSampler does resume mid-epoch (it skips the batches already trained on).
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    # The frozen VAE and text encoder stay in eval mode on purpose (no dropout in what does not train).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    # The `likeness` command hands LightningCLI the arguments it read from sys.argv itself.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
    with reported_errors():
        return cli_class(
            LoRADiffusion,
            FaceDataModule,
            args=args,
            parser_class=LikenessParser,
            parser_kwargs={"description": "likeness: teach Stable Diffusion 1.x one person's face with LoRA."},
            # The model configures its own optimizer and schedule (model.optimizer, model.lr_scheduler); LightningCLI's
            # top-level --optimizer/--lr_scheduler would replace both without a word (issue #10).
            auto_configure_optimizers=False,
            save_config_callback=RunConfig,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={
                # No epoch curve, no hp_metric: TensorBoard opens on the curves that matter (issue #10).
                "logger": {"class_path": "callbacks.step_tensorboard_logger.StepTensorBoardLogger"},
                "enable_model_summary": False,  # LoRADiffusion prints its trainable parameters itself
                "max_steps": 2000,
                # FaceDataModule's EpochSampler shards the data by rank itself (and resumes mid-epoch).
                "use_distributed_sampler": False,
                "log_every_n_steps": 10,
            },
        )


def main(args: list[str] | None = None) -> LikenessCLI:
    """``likeness fit|validate|test|predict …``: LightningCLI with the project's model, data and callbacks."""
    return _cli(LikenessCLI, args)


def prefetch_main(args: list[str]) -> None:
    """``likeness prefetch --config C``: download the base, CLIP and face models that ``fit`` with C needs."""
    from stable_diffusion.model_prefetch import PrefetchSettings, prefetch

    try:
        _cli(_ParseOnlyCLI, ["fit", *args])
    except _Parsed as parsed:
        model, validation = parsed.config["model"], parsed.config["validation"]
        settings = PrefetchSettings(
            base_model=model["pretrained_model_name_or_path"],
            revision=model.get("revision"),
            variant=model.get("variant"),
            model_config=model.get("model_config"),
            clip_model=validation.get("clip_model"),
            face_model=validation.get("face_model"),
            face_detector=validation.get("face_detector"),
        )
        with reported_errors():
            prefetch(settings)


if __name__ == "__main__":
    cli()
