"""Face embeddings of the training photos, computed once and cached on disk."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from datamodules.files import write_atomically
from metrics.face_model import FaceModel


def _deepface_version() -> str:
    try:
        return version("deepface")
    except PackageNotFoundError:
        return "unknown"


class ReferenceEmbeddings:
    """Embed every training image once; later runs with the same files load the ``.npz`` cache.

    The cache key covers each file's resolved path, size and modification time, the face model and detector
    names, the deepface version, ``include_faceless`` and how files are read: changing any of them computes the
    embeddings anew. Paths may hold any characters (deepface is handed pixels, not paths).
    The cache is a plain ``.npz`` read with ``allow_pickle=False`` (no pickle).

    Training images where no face is found are skipped by default (they say nothing about the face; the
    HW script instead kept deepface's whole-image embedding for them: ``include_faceless=True`` does that).

    Args:
        face_model: the model that embeds the images (the same one must embed the generated images).
        cache_dir: folder for the cache files; created when missing.
        include_faceless: keep whole-image embeddings of faceless training images, as the HW did.
    """

    def __init__(self, face_model: FaceModel, cache_dir: str | Path, include_faceless: bool = False) -> None:
        self.face_model = face_model
        self.cache_dir = Path(cache_dir)
        self.include_faceless = include_faceless
        self.cache_hit: bool | None = None  # set by compute(): True when the last call loaded the cache
        self.paths: list[Path] = []  # set by compute(): the files the returned rows belong to

    def _key(self, paths: Sequence[Path]) -> str:
        files = []
        for path in paths:
            stat = path.stat()
            files.append([str(path), stat.st_size, stat.st_mtime_ns])
        description = {
            "files": files,
            "model_name": self.face_model.model_name,
            "detector_backend": self.face_model.detector_backend,
            "deepface": _deepface_version(),
            "include_faceless": self.include_faceless,
            # How files become pixels: caches from when deepface read the files itself (OpenCV) are stale.
            "reader": "load_rgb",
        }
        return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()

    def compute(self, paths: Sequence[str | Path]) -> np.ndarray:
        """Embeddings of the training images that have a face, shape ``(n_faces, dim)``, float64.

        Args:
            paths: the training image files.

        Raises:
            FileNotFoundError: a path is not a file.
            ValueError: no path given, or no image has a face (face distance would be undefined).
        """
        resolved = [Path(p).expanduser().resolve() for p in paths]
        if not resolved:
            raise ValueError("ReferenceEmbeddings.compute: no training images given.")
        for path in resolved:
            if not path.is_file():
                raise FileNotFoundError(f"ReferenceEmbeddings: training image {path} does not exist.")
        key = self._key(resolved)
        cache_file = self.cache_dir / f"reference_embeddings_{key[:20]}.npz"
        if cache_file.is_file():
            with np.load(cache_file, allow_pickle=False) as cached:
                if str(cached["key"]) == key:
                    self.cache_hit = True
                    self.paths = [Path(p) for p in cached["paths"].tolist()]
                    return cached["embeddings"]
        self.cache_hit = False
        embeddings = self.face_model.embed_files(resolved, include_faceless=self.include_faceless)
        kept = [(path, emb) for path, emb in zip(resolved, embeddings, strict=True) if emb is not None]
        if not kept:
            raise ValueError(
                f"ReferenceEmbeddings: {self.face_model.model_name}/{self.face_model.detector_backend} found "
                f"no face in any of the {len(resolved)} training images (e.g. {resolved[0]}); check the "
                "data folder holds photos of the person's face."
            )
        self.paths = [path for path, _ in kept]
        matrix = np.stack([emb for _, emb in kept]).astype(np.float64)
        buffer = io.BytesIO()
        np.savez(buffer, embeddings=matrix, paths=np.array([str(p) for p in self.paths]), key=np.array(key))
        write_atomically(cache_file, buffer.getbuffer())  # an interrupted run never leaves a torn cache
        return matrix
