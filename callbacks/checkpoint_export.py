"""Export the LoRA files from a checkpoint that ``train.py`` wrote, as the ``LoraExport`` callback does in training.

Usage::

    likeness export logs/likeness/version_0/checkpoints/last.ckpt [--out DIR] [--name NAME]
    python -m callbacks.checkpoint_export ...      # the same

writes ``pytorch_lora_weights.safetensors`` (diffusers), ``<name>-step<NNNNNN>.safetensors`` (kohya: ComfyUI,
A1111, Forge) and ``README.md`` into ``<checkpoint dir>/lora/<checkpoint stem>/`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import pickle
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from callbacks.export_facts import (
    FALLBACK_NAME,
    check_lora_name,
    configured_learning_rate,
    lora_file_stem,
    native_resolution,
    training_settings,
)
from callbacks.lora_ema import ema_settings
from callbacks.run_folders import absolute_setting, run_config
from datamodules.files import cannot_write
from lightning_modules.finite import check_finite
from lora_files.lora_formats import export_lora

# LoRADiffusion checkpoints hold only the LoRA tensors on purpose; Lightning's warning listing every frozen
# weight it did not find is noise here (on_load_checkpoint still refuses a checkpoint missing LoRA tensors).


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint dict (tensors and plain data only), or an error saying why ``path`` is not one of ours."""
    if path.is_dir():
        found = ", ".join(sorted(p.name for p in path.glob("*.ckpt"))[:5]) or "none"
        raise FileNotFoundError(f"{path} is a folder; pass one checkpoint file in it (.ckpt files there: {found}).")
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such checkpoint file. Pass a .ckpt written by train.py, e.g. "
            "logs/likeness/version_0/checkpoints/last.ckpt."
        )
    if not zipfile.is_zipfile(path):  # what torch.save writes; also spares torch.load's puzzling errors
        raise ValueError(f"{path}: not a PyTorch checkpoint. Pass a .ckpt written by train.py (not a LoRA file).")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, KeyError, EOFError) as err:
        raise ValueError(f"{path}: not a PyTorch Lightning checkpoint that loads safely ({err}).") from err
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if (
        not isinstance(hparams, dict)
        or "pretrained_model_name_or_path" not in hparams
        or "state_dict" not in checkpoint
    ):
        raise ValueError(
            f"{path}: not a likeness checkpoint (no LoRADiffusion hyperparameters and LoRA state dict). "
            "Pass a .ckpt from the checkpoints folder of a train.py run."
        )
    check_finite(checkpoint["state_dict"], str(path), "Nothing was exported: use an earlier checkpoint of the run.")
    return checkpoint


def _captions(datamodule_hparams: dict[str, Any]) -> list[str]:
    """The training captions, read again from the run's data folder; none if it moved or changed shape."""
    from datamodules.folder_scan import DataFolderError, load_pairs

    data_dir = datamodule_hparams.get("data_dir")
    if not data_dir:
        return []
    # As the run trained on them (data.caption_template: the trigger word A1111's tag list then shows).
    template = datamodule_hparams.get("caption_template") or "{caption}"
    try:
        pairs = load_pairs(data_dir, datamodule_hparams.get("skip_bad_files", False))
        return [template.replace("{caption}", pair.caption) for pair in pairs]
    except (DataFolderError, OSError) as err:
        print(f"warning: no caption statistics in the files: {err}", file=sys.stderr)
        return []


def _check_base_model(ckpt_path: Path, checkpoint: dict[str, Any], base_model: str | None) -> None:
    """A base model given as a path is there, or the error says which one and what to pass: found in a second,
    not as a loader's error about ``model.pretrained_model_name_or_path``, a setting this command has not."""
    from stable_diffusion.base_model import looks_like_path

    base = base_model or str(checkpoint["hyper_parameters"]["pretrained_model_name_or_path"])
    if looks_like_path(base) and not Path(base).expanduser().exists():
        if base_model:
            raise FileNotFoundError(f"--base-model {base}: no such file or folder; give the SD1.x model the run used.")
        raise FileNotFoundError(
            f"{ckpt_path}: the run's base model {base}: no such file or folder; pass --base-model with where it is now."
        )


def export_checkpoint(
    ckpt_path: str | Path,
    out: str | Path | None = None,
    name: str | None = None,
    base_model: str | None = None,
) -> dict[str, Path]:
    """Rebuild the LoRADiffusion of ``ckpt_path`` and write the callback's three files for it.

    Args:
        ckpt_path: A checkpoint written by ``train.py`` (``last.ckpt``, ``step*.ckpt``, ``best_identity.ckpt``).
        out: Output folder; default ``<checkpoint dir>/lora/<checkpoint stem>/``.
        name: LoRA name: the kohya file is ``<name>-step<NNNNNN>.safetensors``; default: the name the run
            exported under (``export.name``, else its logger name and version).
        base_model: Base model to load instead of the checkpoint's ``pretrained_model_name_or_path`` (it moved);
            the files then name this one.

    Returns:
        ``{"diffusers": ..., "kohya": ..., "model_card": ...}`` paths.
    """
    from lightning_modules.lora_diffusion import LoRADiffusion

    check_lora_name(name, "--name")
    ckpt_path = Path(ckpt_path).expanduser()
    checkpoint = read_checkpoint(ckpt_path)
    folder = Path(out).expanduser() if out else ckpt_path.parent / "lora" / ckpt_path.stem
    if reason := cannot_write(folder):  # asked before the base model loads, which takes a while
        raise ValueError(
            f"{folder}: cannot write the LoRA files there ({reason}); pass --out with a folder you can write to."
        )
    _check_base_model(ckpt_path, checkpoint, base_model)
    # Absolute, as a run saves it: the card and the kohya metadata name a path that means something elsewhere.
    base_model = absolute_setting("pretrained_model_name_or_path", base_model) if base_model else None
    overrides = {"pretrained_model_name_or_path": base_model} if base_model else {}
    # The CLI's hyperparameters carry `_instantiator`, so the optimizer's class_path dict is rebuilt as well.
    module = LoRADiffusion.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True, **overrides)
    dm_hparams = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    config = run_config(ckpt_path)
    trainer_config = config.get("trainer") or {}
    groups = (checkpoint.get("optimizer_states") or [{}])[0].get("param_groups") or [{}]
    callbacks = checkpoint.get("callbacks") or {}
    name = name or callbacks.get("LoraExport", {}).get("name") or FALLBACK_NAME
    steps = int(checkpoint.get("global_step", 0))
    # The last validation's numbers, as the IdentityValidation callback kept them in the checkpoint.
    metrics = next((v.get("last_metrics") for k, v in callbacks.items() if k.startswith("IdentityValidation")), None)
    return export_lora(
        folder,
        module.unet,
        module.text_encoder,
        name=lora_file_stem(name, steps),
        base_model=str(module.hparams.pretrained_model_name_or_path),
        steps=steps,
        resolution=dm_hparams.get("resolution") or native_resolution(module),
        captions=_captions(dm_hparams),
        metrics=metrics or None,
        settings=training_settings(
            module.hparams,
            dm_hparams,
            precision=trainer_config.get("precision"),
            max_steps=trainer_config.get("max_steps"),
            learning_rate=configured_learning_rate(groups[0]),
            prediction_type=module.noise_scheduler.config.prediction_type,
            seed=config.get("seed_everything"),
        )
        # With EMA on, the checkpoint's state_dict is the EMA (callbacks/lora_ema.py): the card says so.
        | ema_settings(callbacks.get("LoraEMA")),
        started_at=callbacks.get("LoraExport", {}).get("started_at"),
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``CKPT [--out DIR] [--name NAME] [--base-model PATH]``; bad input exits 2 with one message."""
    from likeness_command import CommandParser
    from stable_diffusion.base_model import BaseModelError

    parser = CommandParser(
        prog="likeness export",
        description="Write the diffusers and kohya LoRA files and a model card from a likeness checkpoint.",
    )
    parser.add_argument("checkpoint", help="a .ckpt written by train.py")
    parser.add_argument("--out", help="output folder (default: <checkpoint dir>/lora/<checkpoint stem>)")
    parser.add_argument(
        "--name", help="LoRA name: the kohya file is NAME-stepNNNNNN.safetensors (default: the run's export name)"
    )
    parser.add_argument("--base-model", help="base model path or Hub id, if it moved since training")
    args = parser.parse_args(argv)
    try:
        files = export_checkpoint(args.checkpoint, args.out, args.name, args.base_model)
    except (BaseModelError, FileNotFoundError, ValueError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from err
    except OSError as err:  # while writing: a full disk, a folder that went read-only
        print(f"error: exporting failed: {err}. Files exported before are as they were.", file=sys.stderr)
        raise SystemExit(1) from err
    for kind, path in files.items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
