"""Pair every photo of a training folder with its caption, and refuse (or skip) what is broken.

The folder holds ``NAME.jpg|.jpeg|.png|.webp`` beside ``NAME.txt``. Pairing is by file stem, never by sorting two
lists side by side: one missing caption would otherwise shift every later caption onto the wrong photo.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
CAPTION_SUFFIX = ".txt"
# Image files people have that the training loader does not take: named as such, not as "caption without an image".
OTHER_IMAGE_SUFFIXES = (".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif", ".jxl")
MIN_SIDE = 16  # a photo this small, upscaled to the training resolution, teaches blur


class DataFolderError(ValueError):
    """The training folder cannot be used as it is; the message lists every problem."""


@dataclass(frozen=True)
class Pair:
    image: Path
    caption: str


@dataclass
class FolderScan:
    """The usable pairs of a folder and every problem found, by kind."""

    folder: Path
    pairs: list[Pair] = field(default_factory=list)
    images_without_caption: list[Path] = field(default_factory=list)
    captions_without_image: list[Path] = field(default_factory=list)
    bad_files: list[tuple[Path, str]] = field(default_factory=list)
    subfolder_images: dict[Path, int] = field(default_factory=dict)  # photos per sub-folder, which are not read

    @property
    def problems(self) -> list[str]:
        lines = [f"image without a caption file ({p.stem}.txt): {p}" for p in self.images_without_caption]
        lines += [f"caption without an image: {p}" for p in self.captions_without_image]
        lines += [f"{why}: {p}" for p, why in self.bad_files]
        return lines

    def report(self) -> str:
        return "\n".join(f"  - {line}" for line in self.problems)


def _read_caption(path: Path) -> tuple[str | None, str]:
    try:
        text = path.read_bytes().decode("utf-8-sig")  # -sig: a BOM (Windows editors) is not a caption token
    except UnicodeDecodeError:
        return None, "caption is not UTF-8 text"
    except OSError as err:
        return None, f"caption cannot be read ({err.strerror})"
    # One line, single spaces: CLIP's tokenizer reads any whitespace run as one space, and the kohya metadata's tag
    # counts and the model card then see the caption as training did (a CRLF inside made a tag "smiling\r\nin a park").
    text = " ".join(text.split())
    return (text, "") if text else (None, "caption is empty")


def _check_image(path: Path) -> str:
    if path.stat().st_size == 0:
        return "image file is empty"
    try:
        with Image.open(path) as image:
            image.load()  # verify() misses truncated files; a full decode does not
            size = image.size
    except Image.DecompressionBombError as err:
        return f"image is too large to open safely ({err}); shrink it"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        return f"image cannot be read ({type(err).__name__}: {err})"
    if min(size) < MIN_SIDE:
        return f"image is only {size[0]}x{size[1]} pixels (at least {MIN_SIDE} on each side)"
    return ""


def scan_folder(folder: str | Path) -> FolderScan:
    """Pair images and captions of ``folder`` by stem and record every problem (reads each file once)."""
    folder = Path(folder).expanduser()
    scan = FolderScan(folder)
    if not folder.is_dir():
        raise DataFolderError(
            f"Training data folder {folder} does not exist or is not a folder. "
            "Set data.data_dir to a folder of NAME.jpg|.png|.webp photos, each beside a NAME.txt caption."
        )
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.name != "__MACOSX")
    images: dict[str, Path] = {}
    captions: dict[str, Path] = {}
    others: set[str] = set()
    for path in entries:
        suffix = path.suffix.lower()
        if path.is_symlink() and not path.exists():
            scan.bad_files.append((path, "broken symbolic link"))
            others.add(path.stem)
        elif not path.is_file():
            if found := _photos_below(path):
                scan.subfolder_images[path] = found
        elif suffix in IMAGE_SUFFIXES:
            if path.stem in images:
                scan.bad_files.append((path, f"a second image for caption {path.stem}.txt"))
                continue
            images[path.stem] = path
        elif suffix in OTHER_IMAGE_SUFFIXES:
            scan.bad_files.append((path, f"{suffix} images are not read: convert it to .jpg or .png"))
            others.add(path.stem)
        elif suffix == CAPTION_SUFFIX:
            if path.stem in captions:
                scan.bad_files.append((path, f"a second caption for {path.stem} ({captions[path.stem].name})"))
                continue
            captions[path.stem] = path
    for stem, image in images.items():
        if stem not in captions:
            scan.images_without_caption.append(image)
            continue
        caption, why = _read_caption(captions[stem])
        if caption is None:
            scan.bad_files.append((captions[stem], why))
            continue
        why = _check_image(image)
        if why:
            scan.bad_files.append((image, why))
            continue
        scan.pairs.append(Pair(image, caption))
    scan.captions_without_image = [p for stem, p in captions.items() if stem not in images and stem not in others]
    return scan


def _photos_below(folder: Path) -> int:
    """Photos anywhere below ``folder``; not hidden files or folders, nor a Mac zip's ``__MACOSX`` (its ``._NAME.jpg``
    files are resource forks, not photos: moving them up made unreadable "photos")."""
    count = 0
    for path in folder.rglob("*"):
        parts = path.relative_to(folder).parts
        if any(part.startswith(".") or part == "__MACOSX" for part in parts):
            continue
        count += path.suffix.lower() in IMAGE_SUFFIXES
    return count


def load_pairs(folder: str | Path, skip_bad_files: bool = False) -> list[Pair]:
    """The usable pairs of ``folder``; raise one error listing every problem unless ``skip_bad_files``."""
    scan = scan_folder(folder)
    subfolders = ""
    if scan.subfolder_images:
        most = max(scan.subfolder_images, key=scan.subfolder_images.get)
        subfolders = (
            f"{sum(scan.subfolder_images.values())} photo(s) are in sub-folders of {scan.folder}, which are not read "
            f"({most.name}/ holds {scan.subfolder_images[most]}): set data.data_dir to the folder that holds the "
            f"photos (e.g. {most}), or move them up."
        )
    if not scan.pairs:
        detail = f"\n{scan.report()}" if scan.problems else ""
        detail += f"\n{subfolders}" if subfolders else ""
        raise DataFolderError(
            f"Training data folder {scan.folder} has no usable image-caption pair{detail}\n"
            f"Put photos ({', '.join(IMAGE_SUFFIXES)}) there, each beside a caption file with the same name "
            "and a .txt suffix."
        )
    if scan.problems and not skip_bad_files:
        raise DataFolderError(
            f"Training data folder {scan.folder} has {len(scan.problems)} problem(s):\n{scan.report()}\n"
            "Fix or remove these files, or set data.skip_bad_files: true to train on the "
            f"{len(scan.pairs)} good pair(s) and skip them."
        )
    if scan.problems:
        rank_zero_warn(f"Skipping {len(scan.problems)} file(s) in {scan.folder}:\n{scan.report()}")
    if subfolders:
        rank_zero_warn(subfolders)
    return scan.pairs
