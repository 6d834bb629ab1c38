"""Score a set of generated images the way NTU GenAI HW10 graded them: face distance, CLIP score, faceless."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from metrics.clip_score import ClipScore
from metrics.face_distance import FaceDistance, rubric_points
from metrics.face_model import FaceModel
from metrics.faceless_count import FacelessCount
from metrics.reference_embeddings import ReferenceEmbeddings

# The HW rubric's floors for 25 prompts: CLIP score above 22, at most 5 faceless images.
HW_PROMPTS = 25
HW_MAX_FACELESS = 5


@dataclass
class IdentityScores:
    """One validation's numbers. ``face_distance`` and ``clip_score`` are NaN when no image has a face."""

    face_distance: float
    clip_score: float
    faceless_count: int
    images: int
    face_found: list[bool]

    @property
    def faceless_rate(self) -> float:
        return self.faceless_count / self.images if self.images else math.nan

    @property
    def rubric_points(self) -> int:
        return rubric_points(self.face_distance)

    def passes(self, min_clip_score: float, max_faceless_fraction: float) -> bool:
        """The HW floors, scaled to the number of prompts: CLIP > min and faceless <= fraction of images."""
        allowed = math.floor(max_faceless_fraction * self.images + 1e-9)
        return (
            not math.isnan(self.face_distance)
            and (math.isnan(self.clip_score) or self.clip_score > min_clip_score)
            and self.faceless_count <= allowed
        )

    def as_metrics(self, prefix: str) -> dict[str, float]:
        """Loggable numbers; undefined ones (NaN) are left out rather than logged as 0."""
        values = {
            "face_distance": self.face_distance,
            "clip_score": self.clip_score,
            "faceless_count": float(self.faceless_count),
            "faceless_rate": self.faceless_rate,
            # Points follow from the face distance: undefined with it.
            "rubric_points": math.nan if math.isnan(self.face_distance) else float(self.rubric_points),
        }
        return {f"{prefix}/{k}": v for k, v in values.items() if not math.isnan(v)}


# Scoring runs on rank 0 alone (the validation callback's reports are rank_zero_only): a torchmetrics sync on
# compute would wait forever for ranks that never score (a DDP deadlock, issue #8).
LOCAL = {"sync_on_compute": False}


class IdentityScorer:
    """Embeds the training photos once, then scores generated images against them.

    Args:
        face_model: the face detector + recognition model (runs on the CPU).
        reference_paths: the training photos.
        cache_dir: where the training photos' embeddings are cached.
        clip_model: CLIP Hub id or local folder; ``None`` skips the CLIP score.
        include_faceless: keep training photos without a detected face (whole-image embedding), as the HW did.
    """

    def __init__(
        self,
        face_model: FaceModel,
        reference_paths: Sequence[Path],
        cache_dir: Path,
        clip_model: str | None = None,
        include_faceless: bool = True,
    ) -> None:
        self.face_model = face_model
        face_model.check()  # a missing model or weights fails here, at start-up
        self.reference = ReferenceEmbeddings(face_model, cache_dir, include_faceless).compute(reference_paths)
        # CLIP stays on the CPU: it must not take GPU memory from training.
        self.clip = ClipScore(clip_model, device="cpu", **LOCAL) if clip_model else None

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> IdentityScores:
        embeddings = self.face_model.embed(images)
        distance, faceless = FaceDistance(self.reference, **LOCAL), FacelessCount(**LOCAL)
        distance.update(embeddings)
        faceless.update(embeddings)
        found = [e is not None for e in embeddings]
        clip_score = math.nan
        if self.clip is not None:
            self.clip.reset()
            # The HW scored only the images in which a face was found.
            self.clip.update(
                [im for im, f in zip(images, found, strict=True) if f],
                [p for p, f in zip(prompts, found, strict=True) if f],
            )
            clip_score = float(self.clip.compute()) if any(found) else math.nan
        return IdentityScores(
            face_distance=float(distance.compute()) if any(found) else math.nan,
            clip_score=clip_score,
            faceless_count=int(faceless.compute()["count"]),
            images=len(images),
            face_found=found,
        )
