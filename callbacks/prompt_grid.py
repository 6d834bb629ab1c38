"""Images as files and as one TensorBoard grid: each prompt readable beside its image, the verdict under it."""

from __future__ import annotations

import io
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from datamodules.files import write_atomically

ROW = 256  # image side in the grid
LABEL = 28  # height of the verdict strip under each image
ROW_HEIGHT = ROW + LABEL
TEXT_WIDTH = 360
IMAGE_NAME = "valid_image_{}.png"  # the HW's names; `likeness score --images` maps them back to prompt lines
# Strip colours: the verdict must read at a glance across 25 rows.
MATCH_COLOUR = (24, 128, 56)
NO_MATCH_COLOUR = (176, 32, 32)


def _font(size: int = 16) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def prompt_grid(
    images: Sequence[Image.Image], prompts: Sequence[str], labels: Sequence[str], matches: Sequence[bool]
) -> Image.Image:
    """One row per image: the image with its label in a strip under it, then its prompt wrapped.

    Args:
        images: the generated images.
        prompts: their prompts.
        labels: one line per image for the strip (the identity verdict and its distance).
        matches: per image, whether it is the person: the strip is green, else red.
    """
    grid = Image.new("RGB", (ROW + TEXT_WIDTH, ROW_HEIGHT * len(images)), "white")
    draw, font = ImageDraw.Draw(grid), _font()
    for row, (image, prompt, label, match) in enumerate(zip(images, prompts, labels, matches, strict=True)):
        top = row * ROW_HEIGHT
        grid.paste(image.convert("RGB").resize((ROW, ROW), Image.Resampling.LANCZOS), (0, top))
        draw.rectangle(
            [(0, top + ROW), (ROW - 1, top + ROW_HEIGHT - 1)], fill=MATCH_COLOUR if match else NO_MATCH_COLOUR
        )
        draw.text((6, top + ROW + 5), label, fill="white", font=font)
        lines = textwrap.wrap(f"{row}: {prompt}", width=36)[:12]
        draw.multiline_text((ROW + 10, top + 10), "\n".join(lines), fill="black", font=font, spacing=4)
        draw.line([(0, top), (grid.width, top)], fill="gray")
    return grid


def save_png(path: Path, image: Image.Image, metadata: dict[str, object]) -> Path:
    """Save ``image`` as PNG with ``metadata`` as text chunks (readable with ``Image.open(path).text``)."""
    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, str(value))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    write_atomically(path, buffer.getbuffer())  # a kill or a full disk never leaves a torn image
    return path


def save_images(
    folder: Path,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    stage: str = "val",
    seeds: Sequence[int] | None = None,
    settings: Mapping[str, object] | None = None,
) -> list[Path]:
    """Write ``valid_image_<i>.png`` (the HW's names) with the prompt (and seed, and the generation ``settings``)
    in each file's metadata.

    Images numbered past ``images`` that an earlier, longer run wrote into the same folder are removed: left there,
    the folder would hold more images than prompts (``likeness score --images`` refuses that). Only files this
    function wrote go (their PNG text has a ``stage``), never a user's own.
    """
    seeds = [None] * len(images) if seeds is None else seeds
    paths = []
    for i, (image, prompt, seed) in enumerate(zip(images, prompts, seeds, strict=True)):
        metadata = {"prompt": prompt, "stage": stage} | ({} if seed is None else {"seed": seed}) | dict(settings or {})
        paths.append(save_png(folder / IMAGE_NAME.format(i), image, metadata))
    stale = len(images)
    while (folder / IMAGE_NAME.format(stale)).is_file():
        path = folder / IMAGE_NAME.format(stale)
        with Image.open(path) as old:
            ours = "stage" in getattr(old, "text", {})
        if not ours:
            break
        path.unlink()
        stale += 1
    return paths
