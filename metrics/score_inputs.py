"""What ``likeness score`` is asked to score, checked before any model loads: one error line naming the setting."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from callbacks.prompt_grid import IMAGE_NAME
from callbacks.run_folders import run_config
from datamodules.folder_scan import IMAGE_SUFFIXES, DataFolderError, Pair, load_pairs
from metrics.score_files import GRID_PNG

HW_NAME = re.compile(re.escape(IMAGE_NAME).replace(r"\{\}", r"(\d+)"))  # valid_image_<i>.png
DIFFUSERS_LORA = "pytorch_lora_weights.safetensors"


class ScoreInputError(ValueError):
    """A ``likeness score`` setting cannot be used as given; the message names it and says what to give."""


def natural_key(path: Path) -> list[Any]:
    """``img2.png`` before ``img10.png``: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def image_files(folder: Path, prompts: list[str], prompts_file: str) -> list[Path]:
    """The images of ``folder`` in prompt order: ``valid_image_<i>.png`` is prompt ``i``, other names natural order.

    Raises:
        ScoreInputError: no such folder, no images, a gap in the HW's numbering, a count that is not the prompts',
            or an image whose own PNG metadata names another prompt (it was generated from another line).
    """
    if not folder.is_dir():
        raise ScoreInputError(f"--images {folder}: no such folder. Give the folder of images to score.")
    files = [
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and p.name != GRID_PNG and not p.name.startswith(".")
    ]
    if not files:
        raise ScoreInputError(f"--images {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in it.")
    numbered = {int(m.group(1)): p for p in files if (m := HW_NAME.fullmatch(p.name))}
    if numbered:
        others = sorted(p.name for p in files if p not in numbered.values())
        missing = sorted(set(range(max(numbered) + 1)) - set(numbered))
        if others or missing:
            problem = (
                f"other images beside them ({', '.join(others[:3])})"
                if others
                else (f"{IMAGE_NAME.format(missing[0])} is missing")
            )
            raise ScoreInputError(
                f"--images {folder}: holds {IMAGE_NAME.format('<i>')} files (image i is prompt line i+1) but "
                f"{problem}. Give a folder with one image per prompt."
            )
        files = [numbered[i] for i in sorted(numbered)]
    else:
        files.sort(key=natural_key)
    if len(files) != len(prompts):
        raise ScoreInputError(
            f"--images {folder} has {len(files)} images but --prompts {prompts_file} has {len(prompts)} prompts: "
            f"give one image per prompt line ({IMAGE_NAME.format('<i>')} is line i+1; other names pair in natural "
            "order)."
        )
    for i, (file, prompt) in enumerate(zip(files, prompts, strict=True)):
        try:
            with Image.open(file) as image:
                own = getattr(image, "text", {}).get("prompt")
        except (UnidentifiedImageError, OSError) as err:
            raise ScoreInputError(f"--images: {file} cannot be read as an image ({err}).") from None
        if own is not None and own.strip() != prompt:
            raise ScoreInputError(
                f"--images: {file.name} was generated from the prompt {own!r}, but line {i + 1} of --prompts "
                f"{prompts_file} is {prompt!r}. Give the prompt file the images were generated from."
            )
    return files


def lora_file(given: Path) -> Path:
    """The LoRA ``.safetensors`` that ``--lora`` names (a folder: its diffusers file, or its one file), checked."""
    from safetensors import safe_open

    if given.is_dir():
        found = sorted(given.glob("*.safetensors"))
        if (given / DIFFUSERS_LORA).is_file():
            given = given / DIFFUSERS_LORA
        elif len(found) == 1:
            given = found[0]
        else:
            listing = ", ".join(p.name for p in found) or "none"
            raise ScoreInputError(f"--lora {given}: give one LoRA file of this folder (.safetensors here: {listing}).")
    if not given.is_file():
        raise ScoreInputError(f"--lora {given}: no such file or folder. Give an exported LoRA .safetensors file.")
    if given.suffix != ".safetensors":
        hint = " For a training checkpoint use --ckpt." if given.suffix == ".ckpt" else ""
        raise ScoreInputError(f"--lora {given}: not a .safetensors LoRA file (kohya or diffusers).{hint}")
    try:
        with safe_open(str(given), "pt") as file:
            keys = list(file.keys())  # noqa: SIM118 - safe_open is no dict
    except Exception as err:  # noqa: BLE001 - safetensors' own error types: any unreadable file is one message
        raise ScoreInputError(f"--lora {given}: not a readable safetensors file ({err}).") from None
    if not any("lora" in key for key in keys):
        raise ScoreInputError(f"--lora {given}: holds no LoRA tensors (no lora_* keys); is it a base model?")
    return given


def _check_base(base: str, what: str, advice: str = "give a diffusers folder, a .safetensors file or a Hub id") -> None:
    """A base model given as a path must be there: found now, not after minutes of embedding the photos."""
    from stable_diffusion.base_model import looks_like_path

    if looks_like_path(base) and not Path(base).expanduser().exists():
        raise ScoreInputError(f"{what} {base}: no such file or folder; {advice}.")


class ScoreInputs:
    """The inputs of one ``likeness score``, resolved and checked by :meth:`check` (cheap: no model loads).

    Args: as :class:`metrics.score_command.ScoreCommand`'s of the same names.
    """

    def __init__(
        self,
        photos: str | None = None,
        prompts: str | None = None,
        images: str | None = None,
        lora: str | None = None,
        base: str | None = None,
        ckpt: str | None = None,
        out: str | None = None,
        steps: int | None = None,
        skip_bad_files: bool = False,
    ) -> None:
        path = lambda value: Path(value).expanduser() if value else None  # noqa: E731
        self.photos, self.prompts_file = path(photos), prompts
        self.images, self.lora, self.base, self.ckpt = path(images), path(lora), base, path(ckpt)
        self.out, self.steps, self.skip_bad_files = path(out), steps, skip_bad_files
        self.pairs: list[Pair] = []
        self.prompts: list[str] = []
        self.files: list[Path] = []
        self.loaded: list[Image.Image] = []
        self.checkpoint: dict[str, Any] = {}
        self.run_config: dict[str, Any] = {}

    def check(self) -> None:
        """Resolve defaults and check everything; raise :class:`ScoreInputError` (or the loaders' errors) at once."""
        given = [name for name in ("images", "lora", "ckpt") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ScoreInputError("give exactly one of --images DIR, --lora FILE --base MODEL, --ckpt CKPT.")
        if self.steps is not None and self.steps < 1:
            raise ScoreInputError(f"--steps {self.steps}: give 1 or more.")
        if self.base and self.images is not None:
            raise ScoreInputError("--base goes with --lora (or --ckpt, for a base model that moved); not --images.")
        if self.lora is not None:
            if not self.base:
                raise ScoreInputError("--lora needs --base MODEL: the SD1.x model it was trained on.")
            _check_base(self.base, "--base")
            self.lora = lora_file(self.lora)
        if self.ckpt is not None:
            self._read_checkpoint()
        self._read_photos_and_prompts()
        if self.images is not None:
            self.files = image_files(self.images, self.prompts, self.prompts_file)
            from datamodules.image_caption_dataset import load_rgb

            self.loaded = [load_rgb(file) for file in self.files]  # upright 8-bit RGB, as the photos are read
        made = self.lora.parent if self.lora is not None else self.ckpt.parent if self.ckpt is not None else None
        name = self.lora.stem if self.lora is not None else self.ckpt.stem if self.ckpt is not None else ""
        self.out = self.out or (self.images if made is None else made / "score" / name)
        if self.out.exists() and not self.out.is_dir():
            raise ScoreInputError(f"--out {self.out}: is a file; give a folder.")
        if self.out.resolve() == self.photos.resolve():
            # grid.png and the score files there would stop the next fit ("image without a caption file").
            given = "--out" if self.images is None or self.out != self.images else "--images (where scores go)"
            raise ScoreInputError(
                f"{given} {self.out} is the photo folder (--photos); the files scoring writes would break training "
                "on it. Pass --out with another folder."
            )

    def _read_checkpoint(self) -> None:
        from callbacks.checkpoint_export import read_checkpoint

        try:
            self.checkpoint = read_checkpoint(self.ckpt)
        except (FileNotFoundError, ValueError) as err:
            raise ScoreInputError(f"--ckpt {err}") from None
        if self.base:
            _check_base(self.base, "--base")
        else:
            trained_on = str(self.checkpoint["hyper_parameters"]["pretrained_model_name_or_path"])
            _check_base(trained_on, f"--ckpt {self.ckpt}: the run's base model", "pass --base with where it is now")
        data = self.checkpoint.get("datamodule_hyper_parameters") or {}
        # The run's photos and prompts unless given: `likeness score --ckpt CKPT` scores it as the run validated.
        self.photos = self.photos or (Path(data["data_dir"]).expanduser() if data.get("data_dir") else None)
        self.prompts_file = self.prompts_file or data.get("validation_prompts")
        self.skip_bad_files = self.skip_bad_files or bool(data.get("skip_bad_files"))
        self.run_config = run_config(self.ckpt)

    def _read_photos_and_prompts(self) -> None:
        from datamodules.data_settings import read_prompts

        if self.photos is None:
            raise ScoreInputError("--photos DIR is needed: the person's photos, each NAME.jpg beside NAME.txt.")
        if not self.prompts_file:
            raise ScoreInputError("--prompts FILE is needed: the prompts the images are for, one per line.")
        if not self.photos.is_dir():
            raise ScoreInputError(
                f"--photos {self.photos}: no such folder. Give the person's photo folder (NAME.jpg beside NAME.txt)."
            )
        try:
            self.pairs = load_pairs(self.photos, self.skip_bad_files)
        except DataFolderError as err:
            message = str(err).replace("set data.skip_bad_files: true", "pass --skip-bad-files")
            raise ScoreInputError(f"--photos: {message}") from None
        try:
            self.prompts = read_prompts(self.prompts_file, "--prompts")
        except FileNotFoundError as err:
            raise ScoreInputError(str(err)) from None
        if isinstance(self.prompts_file, list):
            self.prompts_file = "the run's data.validation_prompts"
