"""Who is the person: IdentityMatch, deepface's thresholds, and the offline face stack on public-domain photos.

The person: the demo photos (crops of scikit-image's astronaut photo, Eileen Collins, NASA, public domain).
Strangers: the face crops of ``skimage.data.lfw_subset()`` (25x25 grey, upscaled and padded so dlib finds them).
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image, ImageOps
from public_faces import lfw_faces, recomputed_verdicts
from skimage import data

from metrics.face_distance import RUBRIC_MODEL, FaceDistance, rubric_points
from metrics.face_model import FaceModel, FaceModelError
from metrics.identity_match import IdentityMatch
from metrics.identity_scorer import IdentityScorer, IdentityScores

# --- IdentityMatch against a count written out by hand ---------------------------------------------------------


def test_match_rate_counts_faceless_images_as_not_the_person() -> None:
    rng = np.random.default_rng(3)
    distances: list[float | None] = list(rng.uniform(0.1, 0.9, size=12))
    for i in (2, 7, 8):
        distances[i] = None
    threshold = float(np.median([d for d in distances if d is not None]))
    metric = IdentityMatch(threshold)
    metric.update(distances[:5])
    metric.update(distances[5:])
    expected = sum(1 for d in distances if d is not None and d <= threshold) / len(distances)
    assert 0 < expected < 1  # both verdicts occur, and faceless images are in the denominator
    assert metric.compute().item() == pytest.approx(expected, rel=1e-12)
    assert [metric.is_match(d) for d in distances] == [d is not None and d <= threshold for d in distances]


@pytest.mark.filterwarnings("ignore:The ``compute`` method:UserWarning")  # compute before update on purpose
def test_match_boundary_is_inclusive_like_deepface_verify() -> None:
    metric = IdentityMatch(0.4)
    assert metric.is_match(0.4) and not metric.is_match(np.nextafter(0.4, 1)) and not metric.is_match(math.nan)
    assert math.isnan(metric.compute().item())  # no image yet: undefined, not 0
    metric.update([None, None])
    assert metric.compute().item() == 0.0  # two faceless images: neither is the person
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="positive distance"):
            IdentityMatch(bad)


def _scores(face_model: str, face_distance: float, distances: list[float | None], threshold: float) -> IdentityScores:
    matches = [d is not None and d <= threshold for d in distances]
    return IdentityScores(
        face_distance=face_distance,
        clip_score=30.0,
        faceless_count=sum(d is None for d in distances),
        images=len(distances),
        distances=distances,
        matches=matches,
        identity_match_rate=sum(matches) / len(distances),
        threshold=threshold,
        face_model=face_model,
    )


def test_rubric_points_only_for_the_rubric_model() -> None:
    ghost = _scores(RUBRIC_MODEL, 1.21, [1.0, 1.42], 1.1)
    assert ghost.as_metrics("val")["val/rubric_points"] == rubric_points(1.21) == 8
    assert ghost.rubric == "rubric 8/10"
    dlib = _scores("Dlib", 0.59, [0.59, None], 0.4)  # a stranger's distance: 10 points on GhostFaceNet's scale
    assert dlib.rubric_points is None and "val/rubric_points" not in dlib.as_metrics("val")
    assert dlib.rubric == "rubric n/a: rubric needs GhostFaceNet, not Dlib"
    assert dlib.as_metrics("val")["val/identity_match_rate"] == 0.0
    assert dlib.labels() == ["not the person: 0.590 > 0.400", "no face: not the person"]
    assert _scores("Dlib", 0.3, [0.3], 0.4).labels() == ["the person: 0.300 <= 0.400"]


# --- deepface's thresholds and distances ----------------------------------------------------------------------


def test_thresholds_come_from_deepface_and_unknown_models_fail_clearly() -> None:
    from deepface.config.threshold import thresholds  # deepface's table, read directly

    for name in ("Dlib", "SFace", RUBRIC_MODEL, "ArcFace"):
        assert FaceModel(name).verification_threshold("euclidean_l2") == thresholds[name]["euclidean_l2"]
    with pytest.raises(FaceModelError, match="no verification threshold"):
        FaceModel("NoSuchModel").verification_threshold("euclidean_l2")


@pytest.fixture(scope="module")
def face_model(tmp_path_factory: pytest.TempPathFactory) -> FaceModel:
    model = FaceModel(weights_home=tmp_path_factory.mktemp("deepface-home"))
    model.check()
    return model


@pytest.fixture(scope="module")
def scorer(face_model: FaceModel, demo_photos, tmp_path_factory: pytest.TempPathFactory) -> IdentityScorer:
    photos = sorted(p for p in demo_photos.iterdir() if p.suffix in (".jpg", ".png"))
    return IdentityScorer(face_model, photos, tmp_path_factory.mktemp("face-cache"))


def _astronaut_variants() -> list[Image.Image]:
    photo = Image.fromarray(data.astronaut())
    jpeg = io.BytesIO()
    photo.save(jpeg, format="JPEG", quality=10)  # heavy blocking artefacts
    return [
        photo.resize((256, 256), Image.Resampling.LANCZOS),  # shrunk to half
        ImageOps.mirror(photo),
        Image.open(jpeg).convert("RGB"),
        ImageOps.grayscale(photo).convert("RGB"),
    ]


def _strangers(count: int = 100) -> list[Image.Image]:
    return lfw_faces(count)


def test_verdicts_are_deepface_verify_on_each_pair(scorer: IdentityScorer) -> None:
    """With one training photo the verdict is deepface.verify's on that pair, distance and threshold alike.

    So FaceDistance's pair distance is deepface's euclidean_l2 and the scorer reads that metric's threshold (a
    cosine threshold, 0.07 for Dlib, would be read against the wrong scale).
    """
    face_model = scorer.face_model
    deepface = face_model._deepface()
    person, *variants = face_model.embed([Image.fromarray(data.astronaut()), *_astronaut_variants()[:1]])
    strangers = face_model.embed(_strangers(4))
    metric, match = FaceDistance(person[None]), IdentityMatch(scorer.threshold)
    verdicts = []
    for face, distance in zip(variants + strangers, metric.per_face(variants + strangers), strict=True):
        result = deepface.verify(
            person.tolist(), face.tolist(), model_name="Dlib", distance_metric="euclidean_l2", silent=True
        )
        assert distance == pytest.approx(result["distance"], abs=2e-6)  # deepface rounds to 6 decimals
        assert (scorer.threshold, match.is_match(distance)) == (result["threshold"], result["verified"])
        verdicts.append(result["verified"])
    assert verdicts == [True] + [False] * len(strangers)  # the pairs test both verdicts


# --- real photos, offline Dlib model ------------------------------------------------------------------------------


def test_same_person_variants_are_the_person(scorer: IdentityScorer) -> None:
    variants = _astronaut_variants()
    scores = scorer.score(variants, [""] * len(variants))
    # Seen with deepface 0.0.103: distances 0.16-0.28 against Dlib's threshold 0.40.
    assert scores.matches == [True] * len(variants), scores.labels()
    assert scores.identity_match_rate == 1.0


def test_strangers_are_not_the_person_and_dlib_earns_no_rubric_points(scorer: IdentityScorer) -> None:
    strangers = _strangers(10)
    scores = scorer.score(strangers, [""] * len(strangers))
    expected = recomputed_verdicts(scorer, strangers)  # from raw embeddings and deepface's table
    assert scores.matches == expected
    # Seen: none of these 10 is the person (closest 0.48 > 0.40); the slow test below measures all 100.
    assert scores.identity_match_rate <= 0.1
    # Strangers sit far inside the rubric's 1.20 (10 points on GhostFaceNet's scale): Dlib must get no points.
    assert rubric_points(scores.face_distance) == 10
    assert scores.rubric_points is None and "val/rubric_points" not in scores.as_metrics("val")


@pytest.mark.slow
def test_strangers_match_rate_over_all_lfw_faces(scorer: IdentityScorer) -> None:
    strangers = _strangers(100)
    scores = scorer.score(strangers, [""] * len(strangers))
    # Measured with deepface 0.0.103 / dlib 19.24: 0 of 100 strangers are the person (7 faceless; the other
    # 93 at mean distance 0.46-0.69, median 0.55, against Dlib's euclidean_l2 threshold 0.40).
    assert scores.identity_match_rate <= 0.05, sorted(d for d in scores.distances if d is not None)[:5]
    assert scores.faceless_count <= 10
