"""Where a run's outputs go: the one place the callbacks ask for the log and checkpoint folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import yaml

# The settings that name files or folders, saved absolute in a run (config.yaml, the checkpoint's hyperparameters):
# ``likeness export CKPT``, ``score --ckpt`` and a resume then work from any working directory, and the model card
# names the base model by a path that means something outside it.
PATH_SETTINGS = {
    "model": ("pretrained_model_name_or_path", "model_config", "compile_cache_dir"),
    "data": ("data_dir", "validation_prompts", "predict_prompts", "prior_prompts", "cache_dir"),
    "validation": ("clip_model", "cache_dir"),
    "predict_writer": ("output_dir",),
    "checkpoint": ("dirpath",),  # a resume from another directory wrote its checkpoints elsewhere
}
# These may name no path at all (a Hub id like ``org/name``): made absolute only when such a path exists here.
_HUB_OR_PATH = {"pretrained_model_name_or_path", "model_config", "clip_model"}


def absolute_setting(key: str, value: Any) -> Any:
    """``value`` of the path setting ``key`` as an absolute path (``~`` expanded); anything else unchanged."""
    if not isinstance(value, str) or not value or "://" in value:
        return value
    path = Path(value).expanduser()
    if path.is_absolute() and str(path) == value:
        return value
    if key in _HUB_OR_PATH and not path.exists():
        return value
    return str(path.absolute())


def absolute_path_settings(config: Any) -> None:
    """Make the :data:`PATH_SETTINGS` of one subcommand's parsed config absolute, in place; also where the run
    logs (``trainer.default_root_dir``, each logger's ``save_dir``): the run's config.yaml then resumes into the
    same ``logs/<name>`` and finds ``--ckpt_path last`` from any working directory."""
    for section, keys in PATH_SETTINGS.items():
        values = config.get(section)
        for key in keys if values is not None else ():
            if key in values:
                values[key] = absolute_setting(key, values[key])
    trainer = config.get("trainer")
    if trainer is None:
        return
    if trainer.get("default_root_dir"):
        trainer["default_root_dir"] = absolute_setting("default_root_dir", trainer["default_root_dir"])
    loggers = trainer.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        init_args = logger.get("init_args") if hasattr(logger, "get") else None
        if init_args is not None and init_args.get("save_dir"):
            init_args["save_dir"] = absolute_setting("save_dir", init_args["save_dir"])


def log_dir(trainer: L.Trainer) -> Path:
    """The run's log folder (``logs/<name>/version_N``), or the trainer's root without a logger."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def checkpoint_dir(trainer: L.Trainer) -> Path:
    """The ModelCheckpoint's folder, else ``<log dir>/checkpoints``."""
    dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
    return Path(dirpath) if dirpath else log_dir(trainer) / "checkpoints"


def run_folder_of(ckpt_path: Path) -> Path:
    """The run folder a checkpoint belongs to: ``logs/<name>/version_N`` for ``.../version_N/checkpoints/x.ckpt``,
    else the checkpoint's own folder."""
    folder = ckpt_path.expanduser().resolve().parent
    return folder.parent if folder.name == "checkpoints" else folder


def resolve_checkpoint(ckpt_path: str, runs_folder: Path, subcommand: str = "fit") -> Path:
    """The checkpoint file that ``--ckpt_path`` means, or a ``ValueError`` that says what to give instead.

    ``last``: the newest ``last.ckpt`` of the runs in ``runs_folder`` (``logs/<name>``); a folder: its ``last.ckpt``
    (or its ``checkpoints/last.ckpt``); a URL is refused: a checkpoint is a pickle, and one from the network could
    run code while it loads.
    """
    if "://" in ckpt_path:
        raise ValueError(
            f"--ckpt_path {ckpt_path}: checkpoints are not loaded from URLs (a checkpoint is a pickle; one from the "
            "network could run code as it loads). Download it, check where it comes from, and give the local file."
        )
    if ckpt_path == "last":
        found = sorted(runs_folder.glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise ValueError(
                f"--ckpt_path last: no run in {runs_folder} has a checkpoints/last.ckpt. Give the checkpoint file's "
                "path, e.g. logs/<name>/version_0/checkpoints/last.ckpt."
            )
        return found[-1]
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        for candidate in (path / "last.ckpt", path / "checkpoints" / "last.ckpt"):
            if candidate.is_file():
                return candidate
        found = ", ".join(sorted(p.name for p in path.rglob("*.ckpt"))[:5]) or "none"
        raise ValueError(f"--ckpt_path {path} is a folder without last.ckpt; give one .ckpt file (found: {found}).")
    if not path.is_file():
        raise ValueError(f"--ckpt_path {path}: no such file. Give a .ckpt from a run's checkpoints/ folder.")
    if path.suffix == ".safetensors" and subcommand != "fit":
        raise ValueError(
            f"--ckpt_path {path} is a LoRA file; {subcommand} takes a .ckpt from a run's checkpoints/ folder. To "
            f"score a LoRA file: likeness score --lora {path} --base BASE_MODEL --photos DIR --prompts FILE."
        )
    if path.suffix == ".safetensors":
        raise ValueError(
            f"--ckpt_path {path} is a LoRA file: it holds the weights but not the optimizer, schedule and data "
            "position a resume needs. Give a .ckpt from the run's checkpoints/ folder."
        )
    return path


class DropEmptyRun(L.Callback):
    """A command that fails before it wrote anything leaves no ``version_N`` behind (issue #10).

    "Anything": a checkpoint, image, LoRA file or metric. Folders that existed before the command (test or predict
    writing into a trained run) are never touched.

    Args:
        run_dir: the run folder the logger will write to; ``None``: no logger.
    """

    # What LightningCLI and the logger write at start-up, before the first step.
    _START_UP_FILES = ("events.out.tfevents.*", "config*.yaml", "hparams.yaml")

    def __init__(self, run_dir: Path | None) -> None:
        self.run_dir = run_dir
        self.new = run_dir is not None and not run_dir.exists()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not (self.new and trainer.is_global_zero and self.run_dir.is_dir()):
            return
        start_up = {p for pattern in self._START_UP_FILES for p in self.run_dir.glob(pattern)}
        contents = set(self.run_dir.iterdir())
        if contents <= start_up and all(p.is_file() for p in contents) and not _has_scalars(start_up):
            for path in contents:
                path.unlink()
            self.run_dir.rmdir()


def _has_scalars(files: set[Path]) -> bool:
    """Whether any TensorBoard event file in ``files`` holds a logged value (more than its file header)."""
    return any(p.name.startswith("events.out.tfevents.") and p.stat().st_size > 200 for p in files)


def run_config(ckpt: Path) -> dict[str, Any]:
    """A checkpoint's run config (``config.yaml``, which LightningCLI writes beside ``checkpoints/``), or ``{}``."""
    for folder in (ckpt.parent.parent, ckpt.parent):
        config = folder / "config.yaml"
        if config.is_file():
            try:
                loaded = yaml.safe_load(config.read_text(encoding="utf-8"))
            except (yaml.YAMLError, UnicodeDecodeError):
                return {}  # not the CLI's config: the command's defaults apply
            return loaded if isinstance(loaded, dict) else {}
    return {}
