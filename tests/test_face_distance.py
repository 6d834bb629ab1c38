"""FaceDistance (and its per-face terms), FacelessCount and the rubric against an independent NumPy computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from metrics.face_distance import FaceDistance, rubric_points
from metrics.faceless_count import FacelessCount


def _numpy_face_distance(generated: list[np.ndarray | None], reference: np.ndarray) -> float:
    """The HW formula written out pair by pair: mean L2 distance of unit vectors over all pairs."""
    faces = [g for g in generated if g is not None]
    total, pairs = 0.0, 0
    for g in faces:
        g_unit = g / math.sqrt(float(np.dot(g, g)))
        for r in reference:
            r_unit = r / math.sqrt(float(np.dot(r, r)))
            total += math.sqrt(float(np.sum((g_unit - r_unit) ** 2)))
            pairs += 1
    return total / pairs


@pytest.fixture
def embeddings() -> tuple[np.ndarray, list[np.ndarray | None]]:
    rng = np.random.default_rng(7)
    reference = rng.normal(size=(6, 128)) * rng.uniform(0.5, 3.0, size=(6, 1))
    generated: list[np.ndarray | None] = [rng.normal(size=128) * 2.0 for _ in range(9)]
    for i in (1, 4, 5):
        generated[i] = None
    return reference, generated


def test_face_distance_matches_numpy_over_batches(embeddings) -> None:
    reference, generated = embeddings
    metric = FaceDistance(reference)
    # Uneven batches, one of them all None: the result must not depend on how updates were split.
    for batch in (generated[:2], generated[2:4], generated[4:6], generated[6:]):
        metric.update(batch)
    expected = _numpy_face_distance(generated, reference)
    assert metric.compute().item() == pytest.approx(expected, rel=1e-12)


def test_face_distance_matches_the_hw_torch_expression(embeddings) -> None:
    reference, generated = embeddings
    faces = torch.tensor(np.stack([g for g in generated if g is not None]), dtype=torch.float32)
    train = torch.tensor(reference, dtype=torch.float32)
    faces = faces / torch.norm(faces, p=2, dim=-1)[:, None]
    train = train / torch.norm(train, p=2, dim=-1)[:, None]
    hw = torch.cdist(faces, train, p=2).mean().item()
    metric = FaceDistance(torch.tensor(reference))
    metric.update([None if g is None else torch.tensor(g) for g in generated])
    assert metric.compute().item() == pytest.approx(hw, abs=1e-6)


def test_per_face_distances_average_to_the_face_distance(embeddings) -> None:
    reference, generated = embeddings
    metric = FaceDistance(reference)
    per_face = metric.per_face(generated)
    for g, d in zip(generated, per_face, strict=True):
        # Each face's own terms of the pairwise formula: its mean distance to the references.
        assert d is None if g is None else d == pytest.approx(_numpy_face_distance([g], reference), rel=1e-12)
    assert metric.faces == 0  # per_face leaves the state alone
    metric.update(generated)
    assert metric.compute().item() == pytest.approx(np.mean([d for d in per_face if d is not None]), rel=1e-12)


@pytest.mark.filterwarnings("ignore:The ``compute`` method:UserWarning")  # compute before update on purpose
def test_face_distance_is_nan_without_faces(embeddings) -> None:
    reference, _ = embeddings
    metric = FaceDistance(reference)
    assert math.isnan(metric.compute().item())
    metric.update([None, None])
    assert math.isnan(metric.compute().item())
    assert rubric_points(metric.compute()) == 0


@pytest.mark.filterwarnings("ignore:The ``compute`` method:UserWarning")  # compute before update on purpose
def test_face_distance_identical_faces_is_zero_and_resets(embeddings) -> None:
    reference, generated = embeddings
    metric = FaceDistance(reference[:1])
    metric.update([reference[0] * 5.0])  # same direction, other length: distance 0 after normalising
    assert metric.compute().item() == pytest.approx(0.0, abs=1e-12)
    metric.reset()
    assert math.isnan(metric.compute().item())


def test_face_distance_rejects_bad_input(embeddings) -> None:
    reference, _ = embeddings
    with pytest.raises(ValueError, match="no reference"):
        FaceDistance(np.empty((0, 128)))
    metric = FaceDistance(reference)
    with pytest.raises(ValueError, match="same face model"):
        metric.update([np.ones(512)])


@pytest.mark.parametrize(
    ("distance", "points"),
    [
        (0.0, 10),
        (1.20, 10),
        (np.nextafter(1.20, 2), 8),
        (1.22, 8),
        (np.nextafter(1.22, 2), 6),
        (1.25, 6),
        (np.nextafter(1.25, 2), 4),
        (1.28, 4),
        (np.nextafter(1.28, 2), 2),
        (1.30, 2),
        (np.nextafter(1.30, 2), 0),
        (2.0, 0),
        (math.nan, 0),
    ],
)
def test_rubric_points_boundaries(distance: float, points: int) -> None:
    assert rubric_points(distance) == points
    assert rubric_points(torch.tensor(distance, dtype=torch.float64)) == points


@pytest.mark.filterwarnings("ignore:The ``compute`` method:UserWarning")  # compute before update on purpose
def test_faceless_count(embeddings) -> None:
    _, generated = embeddings
    metric = FacelessCount()
    assert math.isnan(metric.compute()["rate"].item())
    metric.update(generated[:5])
    metric.update(generated[5:])
    expected = sum(g is None for g in generated)
    result = metric.compute()
    assert result["count"].item() == expected
    assert result["rate"].item() == pytest.approx(expected / len(generated))
