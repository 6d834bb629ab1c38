"""What ``likeness fit|validate|test|predict`` checks in seconds, before the base model loads: the settings (photo
folder, prompts, crops, caches, face and CLIP models, optimizer) and a ``--ckpt_path`` to resume from."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch.utilities import rank_zero_warn

from callbacks.run_folders import PATH_SETTINGS, absolute_setting
from datamodules.files import cannot_write, default_cache_dir
from lightning_modules.finite import check_finite

# Settings that decide which tensors the LoRA has or what they mean: a checkpoint trained with other values
# cannot be continued with these, so a resume that changes them stops with an error.
STRUCTURAL_SETTINGS = (
    "lora_rank",
    "lora_alpha",
    "unet_target_modules",
    "train_text_encoder",
    "text_encoder_target_modules",
)  # and the optimizer class: its saved state belongs to that class


def plain(value: Any) -> Any:
    """A config value as plain data (jsonargparse Namespaces and tuples vs. the checkpoint's dicts and lists)."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def class_path(value: Any) -> Any:
    return plain(value).get("class_path") if isinstance(plain(value), dict) else value


def check_before_loading(subcommand: str, config: Namespace) -> None:
    """Mistakes found in seconds, before the base model loads for a minute (issue #10): the photo folder, the prompt
    files, crop and caption settings, the CLIP and face models, and an 8-bit optimizer on a machine that cannot run
    it (issue #9)."""
    from datamodules.data_settings import check_crop_and_captions, check_prior_settings, read_prompts
    from datamodules.folder_scan import load_pairs

    _check_numbers(subcommand, config)
    if subcommand in ("validate", "test", "predict") and not config.get("ckpt_path"):
        rank_zero_warn(
            f"{subcommand} without --ckpt_path: this is the base model alone, no trained LoRA. To {subcommand} a "
            "run, pass --ckpt_path with its checkpoint (or `last`)."
        )
    data = config["data"]
    crop_settings = ("crop", "center_crop", "face_margin", "face_scale_jitter", "caption_template", "caption_dropout")
    with warnings.catch_warnings():  # a deprecation warning comes once, from the data module
        warnings.simplefilter("ignore")
        check_crop_and_captions(**{key: plain(data[key]) for key in crop_settings})
    if subcommand == "fit":
        with warnings.catch_warnings():  # skipped files are reported once, when the data module sets up
            warnings.simplefilter("ignore")
            load_pairs(data["data_dir"], data["skip_bad_files"])
    if subcommand in ("fit", "validate", "test"):
        read_prompts(plain(data["validation_prompts"]), "data.validation_prompts")
    if subcommand == "fit":
        check_prior_settings(float(config["model"].get("prior_loss_weight") or 0.0), plain(data.get("prior_prompts")))
    if subcommand == "predict" and data.get("predict_prompts") is not None:
        read_prompts(plain(data["predict_prompts"]), "data.predict_prompts")
    if subcommand == "predict" and (out := (config.get("predict_writer") or {}).get("output_dir")):
        from callbacks.image_writer import check_predict_folder

        check_predict_folder(out, config.get("ckpt_path"))
    for section, given, default, writers in (
        ("data", data.get("cache_dir"), default_cache_dir() / "latents", ("fit",)),
        # validate and test embed the photos' faces into it too
        (
            "validation",
            (config.get("validation") or {}).get("cache_dir"),
            default_cache_dir(),
            ("fit", "validate", "test"),
        ),
    ):
        folder = Path(given).expanduser() if given else default
        if subcommand in writers and (reason := cannot_write(folder)):
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
    accelerator = str(config["trainer"].get("accelerator") or "auto")
    on_cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    mps = getattr(torch.backends, "mps", None)
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not on_cuda and not (mps and mps.is_available()))
    precision = str(config["trainer"].get("precision"))
    if on_cpu and model.get("frozen_dtype") == "float16" and precision in ("16", "16-mixed"):
        # CPU autocast runs group norm in float32 against the float16 weights: "mixed dtype (CPU)" at the first
        # VAE encode, after the base model loaded.
        raise ValueError(
            f"model.frozen_dtype float16 with trainer.precision {precision} (configs/t4.yaml) does not run on a CPU, "
            f"and this run is on the CPU (trainer.accelerator {accelerator}). Leave out configs/t4.yaml here."
        )
    optimizer = str(class_path(config["model"].get("optimizer")) or "")
    if optimizer.startswith("bitsandbytes.") and not on_cuda:
        raise ValueError(
            f"model.optimizer {optimizer}: bitsandbytes' 8-bit optimizers run on CUDA GPUs only, and this run "
            f"trains on the CPU (trainer.accelerator {accelerator}). Use torch.optim.AdamW here; keep the 8-bit "
            "optimizer for a GPU with little memory."
        )


def _check_numbers(subcommand: str, config: Namespace) -> None:
    """Numbers that would run without a word and do nothing (0 steps), too much (validate every step) or fail late,
    after the base model loaded, under a name that is not the setting's (a negative learning rate)."""
    trainer = config["trainer"]
    if subcommand == "fit":
        for key in ("max_steps", "max_epochs"):
            if trainer.get(key) == 0:
                raise ValueError(
                    f"trainer.{key} 0: the run would train nothing. Give the number of "
                    f"{key.removeprefix('max_')} to train (or -1 for no limit on {key.removeprefix('max_')})."
                )
        # train.py hides Lightning's "fewer batches than the logging interval" warning (logging counts steps across
        # epochs); what it was right about is a whole run shorter than the interval: no training curve at all.
        steps, log_every = trainer.get("max_steps"), trainer.get("log_every_n_steps")
        log_every = 50 if log_every is None else log_every  # Lightning's default
        if isinstance(steps, int) and 0 < steps < log_every:
            rank_zero_warn(
                f"trainer.max_steps {steps} is below trainer.log_every_n_steps {log_every}: train/loss is logged every "
                f"{log_every} steps, so this run logs no training curve. Set --trainer.log_every_n_steps {steps} (or "
                "lower) to see one."
            )
    every = (config.get("validation") or {}).get("every_n_steps")
    if every is not None and every < 0:
        raise ValueError(
            f"validation.every_n_steps {every}: give the number of optimizer steps between validations, or 0 to "
            "validate only before the first step and at the end."
        )
    # model.text_encoder_lr is the module's own setting (lora_setup.check_settings); the optimizer's lr is not.
    optimizer = plain(config["model"].get("optimizer"))
    lr = (optimizer.get("init_args") or {}).get("lr") if isinstance(optimizer, dict) else None
    if isinstance(lr, int | float) and not lr > 0:  # `not >` also catches NaN
        raise ValueError(f"model.optimizer.init_args.lr {lr}: give a positive learning rate (SD1.5 LoRA: 1e-4).")


def epochs_done(checkpoint: dict) -> int:
    """The epochs a checkpoint has trained to their end, from its loop counters.

    Not its ``epoch`` field: a save at an epoch's last batch (every periodic one of brad.yaml's) has the running
    epoch's index, one too few, and the ``last.ckpt`` of a run that stopped mid-epoch one too many (Lightning
    counts the epoch finished before that save).
    """
    try:
        fit_loop = checkpoint["loops"]["fit_loop"]
        completed = int(fit_loop["epoch_progress"]["current"]["completed"])
        return completed + bool(fit_loop["epoch_loop.batch_progress"]["is_last_batch"])
    except (KeyError, TypeError, ValueError):  # no loop state (saved without a trainer's fit loop)
        return int(checkpoint.get("epoch", 0))


def check_resume(ckpt_path: str, subcommand: str, config: Namespace) -> None:
    """Refuse ``--ckpt_path`` when it is no likeness checkpoint, holds non-finite LoRA weights, has nothing left to
    train, or was trained with other LoRA-shaping settings (:data:`STRUCTURAL_SETTINGS`); warn of other changed
    settings, which apply from the resumed step on."""
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
    max_steps = config["trainer"].get("max_steps")
    step = int(checkpoint.get("global_step", 0))
    if subcommand == "fit" and max_steps is not None and 0 <= max_steps <= step:
        raise ValueError(
            f"--ckpt_path {ckpt_path} is at step {step} and trainer.max_steps is {max_steps}: nothing is left to "
            "train. To train on, raise --trainer.max_steps (the learning-rate schedule then spans the new "
            "length; a warning shows how the rate changes)."
        )
    max_epochs, epoch = config["trainer"].get("max_epochs"), epochs_done(checkpoint)
    steps_left = max_steps is None or max_steps < 0 or step < max_steps
    if subcommand == "fit" and steps_left and isinstance(max_epochs, int) and 0 < max_epochs <= epoch:
        raise ValueError(
            f"--ckpt_path {ckpt_path} has trained {epoch} epoch{'s' * (epoch != 1)} (step {step}) and "
            f"trainer.max_epochs is {max_epochs}: nothing is left to train. To train on, raise --trainer.max_epochs."
        )
    conflicts, changes = [], []
    for section, saved in (
        ("model", checkpoint.get("hyper_parameters", {})),
        ("data", checkpoint.get("datamodule_hyper_parameters", {})),
    ):
        current = config[section]
        for key, old in saved.items():
            new = plain(current.get(key))
            if key in PATH_SETTINGS[section]:  # saved relative by older versions
                old = absolute_setting(key, old)
            if key.startswith("_") or key not in current or plain(old) == new:
                continue
            line = f"{section}.{key}: checkpoint {old!r}, config {new!r}"
            structural = section == "model" and (
                key in STRUCTURAL_SETTINGS or (key == "optimizer" and class_path(old) != class_path(new))
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
