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
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from callbacks.atomic_checkpoint_io import AtomicCheckpointIO
from callbacks.identity_validation import IdentityValidation
from callbacks.image_writer import ImageWriter
from callbacks.lora_ema import LoraEMA
from callbacks.lora_export import LoraExport
from callbacks.non_finite_guard import NonFiniteGuard
from callbacks.run_folders import DropEmptyRun, absolute_path_settings, resolve_checkpoint, run_folder_of
from callbacks.step_lr_monitor import StepLearningRateMonitor
from callbacks.step_progress import StepProgressBar
from callbacks.stop_checkpoint import StopCheckpoint
from callbacks.training_crops import TrainingCrops
from datamodules.face_data_module import FaceDataModule
from lightning_modules.lora_diffusion import LoRADiffusion
from run_checks import check_before_loading, check_resume, plain


def _runs_folder(trainer_config: Any) -> Path:
    """``<save_dir>/<name>`` of the configured logger (where the run folders ``version_N`` are)."""
    logger = plain(trainer_config.get("logger"))
    init = logger.get("init_args", {}) if isinstance(logger, dict) else {}
    return Path(init.get("save_dir") or "logs") / str(init.get("name") or "likeness")


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
    (:data:`run_checks.STRUCTURAL_SETTINGS`) is an error.
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
        parser.add_lightning_class_args(StepLearningRateMonitor, "lr_monitor")
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
        ckpt_path = str(
            resolve_checkpoint(str(ckpt_path), _runs_folder(self.config[subcommand]["trainer"]), subcommand)
        )
        self.config[subcommand]["ckpt_path"] = ckpt_path
        check_resume(ckpt_path, subcommand, self.config[subcommand])

    def before_instantiate_classes(self) -> None:
        """Check what is quick to check before the base model loads; validate/test/predict of a checkpoint log and
        write into the run it comes from, not a new version_N."""
        subcommand = self.config.get("subcommand")
        if subcommand:
            check_before_loading(subcommand, self.config[subcommand])
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
    # During fit FaceDataModule serves no validation batches on purpose: IdentityValidation generates on its own
    # schedule (every N optimizer steps), Lightning's validation loop serves `likeness validate`.
    warnings.filterwarnings("ignore", message="Total length of `list` across ranks is zero")
    # Logging counts optimizer steps across epochs: a 7-photo run still logs every N steps (tests/test_train_cli.py).
    warnings.filterwarnings(
        "ignore", message=r"The number of training batches \(\d+\) is smaller than the logging interval"
    )
    # Lightning 2.6's own use of a torch 2.13 deprecation, in every fit: nothing a user of likeness can act on.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
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
