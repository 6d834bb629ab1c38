"""The ``likeness`` command: ``likeness fit|validate|test|predict|export …``, short help, typos answered.

``likeness fit …`` is ``python train.py fit …`` (LightningCLI); ``likeness export CKPT`` is
:mod:`callbacks.checkpoint_export`. Importing this module also quiets what libraries print while they are imported
or load weights and that a user cannot act on (issue #10): transformers' torchvision notices (likeness does not
use torchvision), its weight-loading bars, and Lightning's product tips.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import importlib
import os
import re
import sys
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

from lightning.pytorch.cli import LightningArgumentParser

from stable_diffusion.library_noise import quiet_library_noise

SUBCOMMANDS = {
    "fit": "train a LoRA (validates every validation.every_n_steps, exports LoRA files)",
    "validate": "generate and score the validation prompts with a checkpoint",
    "test": "generate and score all validation prompts with a checkpoint (the HW's 25)",
    "predict": "generate images for prompts with a checkpoint",
    "export": "write the LoRA files (diffusers, kohya/A1111/ComfyUI) of a checkpoint",
    "score": "score images, a LoRA or a checkpoint against the photos: HW numbers, scores.json, scores.csv",
    "prefetch": "download every model a config needs (base, CLIP, face model), then check each loads offline",
}
# Subcommands with their own argparse command line (not LightningCLI): the module whose main(argv) runs them.
STANDALONE = {
    "export": "callbacks.checkpoint_export",
    "score": "metrics.score_command",
}
# The settings a user changes first, as `likeness fit --help` lists them; `--help-all` shows every one.
MAIN_SETTINGS = (
    ("--config FILE", "configs/brad.yaml (HW10), configs/demo.yaml; repeat to add an overlay (configs/t4.yaml)"),
    ("--data.data_dir DIR", "the photos: NAME.jpg beside its caption NAME.txt"),
    ("--data.validation_prompts FILE", "validation prompts, one per line"),
    ("--model.pretrained_model_name_or_path ID", "SD1.5 base: Hub id, diffusers folder or .safetensors file"),
    ("--trainer.max_steps N", "optimizer steps to train"),
    ("--data.batch_size N", "photos per step"),
    ("--data.resolution N", "training image side"),
    ("--model.lora_rank N", "LoRA rank (with --model.lora_alpha)"),
    ("--model.optimizer.init_args.lr LR", "learning rate (--model.text_encoder_lr for the text encoder)"),
    ("--model.lr_scheduler NAME", "constant, cosine, cosine_with_restarts, ... (diffusers' get_scheduler)"),
    ("--validation.every_n_steps N", "generate and score the validation prompts every N steps"),
    (
        "--validation.face_model NAME",
        "Dlib (offline, default), SFace (offline, with face_detector yunet), GhostFaceNet (HW)",
    ),
    ("--ema.decay D", "EMA of the LoRA weights (e.g. 0.999) for validation, checkpoints and LoRA files"),
    ("--data.crop face", "crop around the detected face (center, random, face)"),
    ("--model.prior_loss_weight W", "prior preservation, with --data.prior_prompts '[a photo of a man]' (0: off)"),
    ("--ckpt_path CKPT", "resume: a .ckpt, a run folder, or `last` (the newest run's last.ckpt)"),
    ("--trainer.logger.init_args.name NAME", "run name: logs/NAME/version_N"),
    ("--print_config", "print every setting's value and stop"),
)
# LightningCLI's own top-level optimizer options replace the model's optimizer and schedule without a word.
MOVED = {
    "--optimizer": "the optimizer is model.optimizer: --model.optimizer torch.optim.AdamW "
    "--model.optimizer.init_args.lr 1e-4 (in a config file: under model:)",
    "--lr_scheduler": "the schedule is model.lr_scheduler, with model.lr_warmup_steps and model.lr_num_cycles "
    "(in a config file: under model:)",
}


quiet_library_noise()


_DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT}


@contextlib.contextmanager
def reported_errors() -> Iterator[None]:
    """Bad input: one clear message and exit code 2, not a traceback. Everything written so far stays valid."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from callbacks.atomic_checkpoint_io import CheckpointWriteError
    from datamodules.folder_scan import DataFolderError
    from metrics.clip_score import ClipModelError
    from metrics.face_model import FaceModelError
    from stable_diffusion.base_model import BaseModelError

    try:
        yield
    except (
        DataFolderError,
        BaseModelError,
        FaceModelError,
        ClipModelError,
        CheckpointWriteError,
        MisconfigurationException,
        OSError,  # FileNotFoundError, a full disk (ENOSPC) while exporting: the message names the file
        ValueError,
        KeyError,  # a checkpoint that lacks LoRA tensors of its settings (LoRADiffusion.on_load_checkpoint)
    ) as err:
        if os.environ.get("LIKENESS_DEBUG"):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        if isinstance(err, OSError) and err.errno in _DISK_ERRNOS:
            # A disk that filled up or went read-only under a run (a Colab Drive, a cluster quota).
            message = (
                f"{err}. Files written before are intact (checkpoints and LoRA files are written atomically): free "
                "space or make the folder writable, then continue with --ckpt_path last."
            )
        print(f"error: {message}\n(set LIKENESS_DEBUG=1 to see the traceback)", file=sys.stderr)
        raise SystemExit(2) from err


class CommandParser(argparse.ArgumentParser):
    """argparse for ``likeness export`` and ``likeness score``: one-line errors (no usage block), and a mistyped
    option named first, with the nearest one (argparse answered ``--imgs DIR`` with "--images is required")."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:
        argv = list(sys.argv[1:] if args is None else args)
        valid = [s for action in self._actions for s in action.option_strings]
        for arg in argv:
            if arg == "--":
                break
            option = arg.split("=", 1)[0]
            if option.startswith("--") and option not in valid:
                guess = difflib.get_close_matches(option, valid, n=1, cutoff=0.6)
                self.error(f"unrecognized option {option}" + (f"; did you mean {guess[0]}?" if guess else ""))
        return super().parse_args(argv, namespace)

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (`{self.prog} --help` lists the options)", file=sys.stderr)
        raise SystemExit(2)


class LikenessParser(LightningArgumentParser):
    """LightningCLI's parser with errors a newcomer can act on: no 100-line usage, the nearest valid setting.

    Abbreviations are off: argparse would take ``--trainer.max_step 5`` for ``--trainer.max_steps`` and
    ``--data.res`` for whichever option it happens to prefix; a typo is answered instead.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        # "--optimizer x" on the command line, "'optimizer.init_args.lr'" from a config file's top-level key
        hints = [f"  {moved}" for given, moved in MOVED.items() if re.search(rf"(--|'){given[2:]}\b", message)]
        if "required" in message and "pretrained_model_name_or_path" in message:  # `likeness fit` alone
            hints.append("  start from a config: --config configs/brad.yaml (HW10) or --config configs/demo.yaml")
        if "bitsandbytes" in message:
            hints.append("  8-bit optimizers need `pip install bitsandbytes` and a CUDA GPU")
        if not hints:
            hints = [f"  did you mean {guess}?" for guess in suggestions(message, option_names(parser))]
        prog = parser.prog.replace(" [options]", "")
        command = prog if " " in prog else f"{prog} COMMAND"
        print(
            f"error: {message.strip()}",
            *hints,
            f"(`{command} --help` lists the main settings)",
            sep="\n",
            file=sys.stderr,
        )
        raise SystemExit(2)


def option_names(parser: LightningArgumentParser) -> list[str]:
    """Every ``--option`` a parser (and its subcommand parsers) accepts."""
    names = []
    for action in parser._actions:
        names += [s for s in action.option_strings if s.startswith("--")]
        for sub in (getattr(action, "choices", None) or {}).values():
            if isinstance(sub, LightningArgumentParser):
                names += option_names(sub)
    return names


def suggestions(message: str, valid: Sequence[str], n: int = 1) -> list[str]:
    """The valid options nearest to the unknown ones an error message names (``--data.dat_dir``, ``'data.dat_dir'``)."""
    guesses = []
    for unknown in re.findall(r"(?:--|')([A-Za-z_][\w.]*)", message):
        for guess in difflib.get_close_matches(f"--{unknown}", valid, n=n, cutoff=0.75):
            if guess != f"--{unknown}" and guess not in guesses:
                guesses.append(guess)
    return guesses


def short_help(subcommand: str | None) -> str:
    if subcommand is None:
        lines = [f"usage: likeness {{{','.join(SUBCOMMANDS)}}} ...", ""]
        lines += [f"  {name:<10}{what}" for name, what in SUBCOMMANDS.items()]
        lines += ["", "`likeness fit --help`: the settings that matter; README.md: the whole story."]
        return "\n".join(lines)
    if subcommand == "prefetch":
        return (
            "usage: likeness prefetch --config FILE [--SETTING VALUE ...]\n\n"
            f"{SUBCOMMANDS['prefetch']}.\nIt reads the same config and settings as `likeness fit` (while online)."
        )
    if subcommand in STANDALONE:  # their own argparse help is the short help
        what = SUBCOMMANDS[subcommand]
        return f"usage: likeness {subcommand} ...\n\n{what}\n\n`likeness {subcommand} --help` lists its options."
    lines = [f"usage: likeness {subcommand} --config FILE [--SETTING VALUE ...]", "", SUBCOMMANDS[subcommand], ""]
    lines += [f"  {option:<42}{what}" for option, what in MAIN_SETTINGS]
    lines += [
        "",
        f"Every setting: `likeness {subcommand} --help-all`. README's 'Config keys that matter' explains them.",
    ]
    return "\n".join(lines)


def unknown_subcommand(word: str) -> NoReturn:
    """A mistyped command (``likeness scor``): the nearest one and the list, not argparse's guess at an option."""
    guess = difflib.get_close_matches(word, SUBCOMMANDS, n=1, cutoff=0.6)
    hint = f"  did you mean `likeness {guess[0]}`?\n" if guess else ""
    print(
        f"error: unknown command {word!r}; the commands are {', '.join(SUBCOMMANDS)}\n{hint}"
        "(`likeness --help` says what each does)",
        file=sys.stderr,
    )
    raise SystemExit(2)


def cli(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``likeness`` console script (and of ``python train.py``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    subcommand = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    if subcommand in STANDALONE:
        importlib.import_module(STANDALONE[subcommand]).main(argv[1:])
        return
    if subcommand == "prefetch" and not any(a in ("-h", "--help") for a in argv[1:]):
        from train import prefetch_main

        prefetch_main(argv[1:])
        return
    if subcommand is None and argv and not argv[0].startswith("-"):
        unknown_subcommand(argv[0])
    if subcommand is None and (not argv or argv[0] in ("-h", "--help")):
        print(short_help(None))
        raise SystemExit(0 if argv else 2)
    if subcommand and any(a in ("-h", "--help") for a in argv[1:]):
        print(short_help(subcommand))
        raise SystemExit(0)
    argv = ["--help" if a == "--help-all" else a for a in argv]

    from train import main

    main(argv)


if __name__ == "__main__":
    cli()
