"""Is each generated face the person? The face model's own verification threshold decides."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric


class IdentityMatch(Metric):
    """Share of generated images whose face is the person: ``compute()`` = matching images / all images.

    An image matches when it has a face and that face's distance to the training faces is at most
    ``threshold``. The distance is ``FaceDistance.per_face``: the face's mean L2 distance to every training
    face, both L2-normalised, i.e. deepface's ``euclidean_l2`` distance averaged over the training photos.
    The threshold is the face model's pair threshold for that metric (``FaceModel.verification_threshold``),
    so a match reads "on average this face verifies as the person against a training photo". The mean, not
    the distance to the nearest training photo: the face must look like the person across the training
    photos, not like one of them; and it is the very number the face distance averages, so the distances
    shown in the validation grid average to ``face_distance``. ``<=``, as ``deepface.verify`` decides.

    Images without a face are not the person: they count in the denominator, so the rate falls when faces
    vanish (the face distance alone skips them).

    ``compute()`` is NaN before any image. Update with per-image distances, ``None`` for no face.

    Args:
        threshold: largest distance that still counts as the person, on ``FaceDistance``'s scale.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, threshold: float, **kwargs) -> None:
        super().__init__(**kwargs)
        if not math.isfinite(threshold) or threshold <= 0:
            raise ValueError(f"IdentityMatch: threshold must be a positive distance, got {threshold}.")
        self.threshold = float(threshold)
        self.add_state("matches", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("images", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def is_match(self, distance: float | None) -> bool:
        """Whether one image, with this face distance (``None``: no face), is the person."""
        return distance is not None and float(distance) <= self.threshold  # NaN compares False: no match

    def update(self, distances: Sequence[float | None]) -> None:
        """Add one face distance (``FaceDistance.per_face``) or ``None`` (no face) per generated image."""
        self.matches += sum(self.is_match(d) for d in distances)
        self.images += len(distances)

    def compute(self) -> Tensor:
        """Matching images / all images, or NaN before any image."""
        if self.images == 0:
            return torch.tensor(math.nan, dtype=torch.float64)
        return self.matches.double() / self.images
