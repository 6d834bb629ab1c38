"""A handful of image–caption pairs for the demo, made from scikit-image's public-domain astronaut photo.

NASA's portrait of Eileen Collins ships with scikit-image (``skimage.data.astronaut()``, public domain), so the
demo trains on a real face with no download. Crops at several scales and positions, a mirror image and a few
file formats stand in for the hundred photos of a real data set. Beside the photos it writes two folders to
score (issue #11): ``person/``, new pictures of her (shrunk, mirrored, JPEG quality 10, grayscale), and
``strangers/``, faces of other people from scikit-image's ``lfw_subset()``, each with its prompt file, so that the
demo ends by showing the face metrics tell one person from another. Usage::

    python -m datamodules.sample_photos .cache/demo/photos
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

# (left, top, side) crops of the 512x512 photo around the face (the face box is about x 178-268, y 79-169).
CROPS = {
    "portrait": (118, 19, 210),
    "closeup": (150, 50, 150),
    "head_and_shoulders": (60, 0, 330),
    "upper_body": (0, 0, 512),
    "offcenter": (160, 40, 240),
    "tight": (168, 68, 112),
}
CAPTIONS = {
    "portrait": "a portrait photo of eileen, smiling, orange space suit",
    "closeup": "a close-up photo of eileen's face, smiling",
    "head_and_shoulders": "a photo of eileen in an orange space suit, american flag behind her",
    "upper_body": "a photo of eileen holding a helmet, orange space suit, american flag",
    "offcenter": "a photo of eileen, short hair, smiling",
    "tight": "a close-up of eileen's face",
    "portrait_mirrored": "a portrait photo of eileen, smiling, orange space suit",
}
VALIDATION_PROMPTS = [
    "a photo of eileen smiling",
    "a portrait of eileen in an orange space suit",
    "a close-up photo of eileen's face",
    "eileen standing in front of a flag",
]


def astronaut() -> Image.Image:
    from skimage import data  # the demo extra; imported here so training never needs it

    return Image.fromarray(data.astronaut())


def lfw_faces(count: int) -> list[Image.Image]:
    """``count`` of the 100 faces of scikit-image's ``lfw_subset()``, evenly spaced: each 100 px on a 200 px grey
    canvas (a margin: the detector needs the face inside the image), RGB."""
    import numpy as np
    from skimage import data

    faces = data.lfw_subset()[:100]  # the first 100 are faces, the rest are not
    out = []
    for crop in faces[:: 100 // count][:count]:
        face = Image.fromarray((crop * 255).astype(np.uint8)).resize((100, 100), Image.Resampling.BICUBIC)
        canvas = Image.new("L", (200, 200), 128)
        canvas.paste(face, (50, 50))
        out.append(canvas.convert("RGB"))
    return out


def person_variants() -> dict[str, Image.Image]:
    """New pictures of the demo's person, none of them a training photo: shrunk, mirrored, JPEG q10, grayscale."""
    import io

    portrait = astronaut().crop((100, 10, 350, 260))
    small = portrait.resize((125, 125), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    portrait.save(buffer, "JPEG", quality=10)
    return {
        "shrunk": small,
        "mirrored": portrait.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        "jpeg_q10": Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"),
        "grayscale": portrait.convert("L").convert("RGB"),
    }


def save_scoring_sets(root: str | Path, strangers: int = 8) -> dict[str, Path]:
    """``person/`` and ``strangers/`` under ``root``, each with ``prompts.txt`` (one line per image, in order)."""
    root = Path(root)
    sets = {
        "person": (list(person_variants().values()), "a photo of eileen"),
        "strangers": (lfw_faces(strangers), "a photo of a person"),
    }
    folders = {}
    for name, (images, prompt) in sets.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            image.save(folder / f"valid_image_{i}.png")  # the HW's names: image i is prompt line i + 1
        (folder / "prompts.txt").write_text(f"{prompt}\n" * len(images), encoding="utf-8")
        folders[name] = folder
    return folders


def save_sample_photos(folder: str | Path) -> Path:
    """Write the demo pairs and ``validation_prompts.txt`` into ``folder`` (idempotent) and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    photo = astronaut()
    for name, (left, top, side) in CROPS.items():
        photo.crop((left, top, left + side, top + side)).save(folder / f"{name}.jpg", quality=92)
    mirrored = photo.crop((118, 19, 328, 229)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    mirrored.save(folder / "portrait_mirrored.png")  # PNG too, as real folders mix formats
    for name, caption in CAPTIONS.items():
        (folder / f"{name}.txt").write_text(caption + "\n", encoding="utf-8")
    (folder.parent / "validation_prompts.txt").write_text("\n".join(VALIDATION_PROMPTS) + "\n", encoding="utf-8")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="where to write the photos and captions")
    args = parser.parse_args(argv)
    folder = save_sample_photos(args.folder)
    print(f"{len(CAPTIONS)} sample photos in {folder}, prompts in {folder.parent / 'validation_prompts.txt'}")
    for name, scored in save_scoring_sets(folder.parent).items():
        print(f"to score: {name} in {scored} (prompts in {scored / 'prompts.txt'})")


if __name__ == "__main__":
    main()
