"""Strangers' faces for the face-model tests: scikit-image's ``lfw_subset()`` (public domain), padded so the
detector finds them. Imported by tests as ``from public_faces import lfw_faces`` (pytest puts ``tests/`` on the path).
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from skimage import data


def lfw_faces(count: int) -> list[Image.Image]:
    """``count`` of the 100 LFW faces, evenly spaced, each 100 px on a 200 px grey canvas, RGB."""
    faces = data.lfw_subset()[:100]  # the first 100 are faces, the rest are not
    out = []
    for crop in faces[:: 100 // count][:count]:
        face = Image.fromarray((crop * 255).astype(np.uint8)).resize((100, 100), Image.Resampling.BICUBIC)
        canvas = Image.new("L", (200, 200), 128)  # a margin: the detector needs the face inside the image
        canvas.paste(face, (50, 50))
        out.append(canvas.convert("RGB"))
    return out
