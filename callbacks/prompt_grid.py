"""Images as files and as one TensorBoard grid with each prompt readable beside its image."""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from datamodules.files import write_atomically

ROW = 256  # image side in the grid
TEXT_WIDTH = 360


def _font(size: int = 16) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def prompt_grid(images: Sequence[Image.Image], prompts: Sequence[str], face_found: Sequence[bool]) -> Image.Image:
    """One row per image: the image, then its prompt wrapped, and whether a face was found."""
    grid = Image.new("RGB", (ROW + TEXT_WIDTH, ROW * len(images)), "white")
    draw, font = ImageDraw.Draw(grid), _font()
    for row, (image, prompt, face) in enumerate(zip(images, prompts, face_found, strict=True)):
        top = row * ROW
        grid.paste(image.convert("RGB").resize((ROW, ROW), Image.Resampling.LANCZOS), (0, top))
        lines = textwrap.wrap(f"{row}: {prompt}", width=36)[:10]
        lines += ["", "face found" if face else "NO FACE FOUND"]
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


def save_images(folder: Path, images: Sequence[Image.Image], prompts: Sequence[str], stage: str = "val") -> list[Path]:
    """Write ``valid_image_<i>.png`` (the HW's names) with the prompt in each file's metadata."""
    return [
        save_png(folder / f"valid_image_{i}.png", image, {"prompt": prompt, "stage": stage})
        for i, (image, prompt) in enumerate(zip(images, prompts, strict=True))
    ]
