"""NTU GenAI HW10's face distance: how far generated faces are from the training faces."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

# (upper bound, points) of the HW rubric, best first.
_RUBRIC = ((1.20, 10), (1.22, 8), (1.25, 6), (1.28, 4), (1.30, 2))
# The rubric's bounds are distances between GhostFaceNet embeddings; another model's distances have another
# scale (Dlib strangers sit near 0.55, far inside 1.20), so points are only given for this model.
RUBRIC_MODEL = "GhostFaceNet"
# The name deepface gives FaceDistance's pair distance, for looking up its thresholds: the L2 distance between
# L2-normalised embeddings is deepface's "euclidean_l2" (l2_normalize each, then the euclidean distance). Not
# "cosine": deepface's cosine distance is 1 - cos = euclidean_l2**2 / 2, the same order on another scale, so
# its thresholds would be read against the wrong numbers; nor plain "euclidean", which skips the normalising.
DISTANCE_METRIC = "euclidean_l2"


def _as_matrix(embeddings: Sequence[np.ndarray | Tensor], what: str) -> Tensor:
    rows = [torch.as_tensor(np.asarray(e) if not isinstance(e, Tensor) else e) for e in embeddings]
    if not rows:
        return torch.empty(0, 0, dtype=torch.float64)
    if any(r.ndim != 1 for r in rows) or len({r.numel() for r in rows}) > 1:
        raise ValueError(f"FaceDistance: {what} must be 1-D embeddings of one length each.")
    return torch.stack(rows).to(torch.float64)


def _l2_normalise(matrix: Tensor) -> Tensor:
    return matrix / torch.linalg.vector_norm(matrix, ord=2, dim=-1, keepdim=True)


class FaceDistance(Metric):
    """Mean L2 distance over all (generated, training) pairs of L2-normalised face embeddings.

    This is the HW formula, ``torch.cdist(normalise(generated), normalise(training)).mean()``; lower means
    more alike (0 = same direction, 2 = opposite). Generated images without a face (``None``) are skipped,
    as the HW skipped them; count them with ``FacelessCount``. With no face at all ``compute()`` returns NaN
    (the HW returned 0, which would read as a perfect score): do not log it as a number then.

    Computed in float64 (the HW used float32 on the GPU; the difference is ~1e-7).

    Args:
        reference: training-image embeddings, shape ``(n, dim)`` or a sequence of ``dim``-vectors (see
            ``ReferenceEmbeddings``).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, reference: np.ndarray | Tensor | Sequence[np.ndarray], **kwargs) -> None:
        super().__init__(**kwargs)
        matrix = _as_matrix(list(reference), "reference embeddings")
        if matrix.shape[0] == 0:
            raise ValueError("FaceDistance: no reference (training) embeddings given.")
        # A buffer follows .to(device) with the metric; not persistent, so checkpoints stay free of it.
        self.register_buffer("reference", _l2_normalise(matrix), persistent=False)
        # Sum over generated faces of their mean distance to the references: the mean over all pairs is
        # sum / count, since every generated face is paired with the same n references.
        self.add_state("distance_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("faces", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _mean_distances(self, faces: Sequence[np.ndarray | Tensor]) -> Tensor:
        """Each face's mean distance to the references, shape ``(len(faces),)``."""
        matrix = _as_matrix(faces, "generated embeddings").to(self.reference.device)
        if matrix.shape[1] != self.reference.shape[1]:
            raise ValueError(
                f"FaceDistance: generated embeddings have {matrix.shape[1]} values, the reference ones "
                f"{self.reference.shape[1]}; embed both with the same face model."
            )
        # .double(): a LightningModule cast to half/bf16 also casts this buffer; keep the maths in float64.
        return torch.cdist(_l2_normalise(matrix), self.reference.double(), p=2).mean(dim=1)

    def per_face(self, embeddings: Sequence[np.ndarray | Tensor | None]) -> list[float | None]:
        """Each image's mean distance to the references, ``None`` where it has no face; the state is unchanged.

        These are the terms ``compute()`` averages, so their mean over the faces is the face distance.
        """
        faces = [e for e in embeddings if e is not None]
        distances = iter(self._mean_distances(faces).tolist() if faces else [])
        return [None if e is None else next(distances) for e in embeddings]

    def update(self, embeddings: Sequence[np.ndarray | Tensor | None]) -> None:
        """Add generated-image embeddings; ``None`` entries (no face) are skipped."""
        faces = [e for e in embeddings if e is not None]
        if not faces:
            return
        self.distance_sum += self._mean_distances(faces).sum()
        self.faces += len(faces)

    def compute(self) -> Tensor:
        """The mean pairwise distance, or NaN when no generated image had a face."""
        if self.faces == 0:
            return torch.tensor(math.nan, dtype=torch.float64)
        return self.distance_sum / self.faces


def rubric_points(face_distance: float | Tensor) -> int:
    """HW10 rubric points for a face distance: <=1.20 -> 10, <=1.22 -> 8, <=1.25 -> 6, <=1.28 -> 4,
    <=1.30 -> 2, else (and NaN) 0.

    The thresholds were set for the HW's GhostFaceNet embeddings (``RUBRIC_MODEL``); other face models give
    other scales, so callers give points only for that model (see ``IdentityScores.rubric_points``).
    """
    value = float(face_distance)
    for bound, points in _RUBRIC:
        if value <= bound:  # NaN compares False everywhere, so it falls through to 0
            return points
    return 0
