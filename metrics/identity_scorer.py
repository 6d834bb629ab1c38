"""Score a set of generated images: the HW's face distance, CLIP score and faceless count, and who is in them."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from metrics.clip_score import ClipScore
from metrics.face_distance import DISTANCE_METRIC, RUBRIC_MODEL, FaceDistance, rubric_points
from metrics.face_model import FaceModel
from metrics.faceless_count import FacelessCount
from metrics.identity_match import IdentityMatch
from metrics.reference_embeddings import ReferenceEmbeddings

# The HW rubric's floors for 25 prompts: CLIP score above 22, at most 5 faceless images.
HW_PROMPTS = 25
HW_MAX_FACELESS = 5


@dataclass
class IdentityScores:
    """One validation's numbers. ``face_distance`` and ``clip_score`` are NaN when no image has a face.

    Per image: ``distances`` (its face's mean distance to the training faces, ``None`` without a face),
    ``matches`` (whether that face is the person by ``face_model``'s ``threshold``; see ``IdentityMatch``) and
    ``clip_scores`` (``None`` without a face or without CLIP: the HW scored only images with a face; their mean
    is ``clip_score``). ``seconds``: time per stage (``face``, ``clip``; callers add ``generate`` and ``total``).
    """

    face_distance: float
    clip_score: float
    faceless_count: int
    images: int
    distances: list[float | None]
    matches: list[bool]
    identity_match_rate: float
    threshold: float
    face_model: str
    clip_scores: list[float | None] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def face_found(self) -> list[bool]:
        return [d is not None for d in self.distances]

    @property
    def faceless_rate(self) -> float:
        return self.faceless_count / self.images if self.images else math.nan

    @property
    def rubric_points(self) -> int | None:
        """HW rubric points, or ``None`` when the face model is not the rubric's (its bounds mean nothing there)."""
        return rubric_points(self.face_distance) if self.face_model == RUBRIC_MODEL else None

    @property
    def rubric(self) -> str:
        """The rubric's verdict for the summary line, or why there is none."""
        if self.rubric_points is None:
            return f"rubric n/a: rubric needs {RUBRIC_MODEL}, not {self.face_model}"
        return f"rubric {self.rubric_points}/10"

    @property
    def verdicts(self) -> list[str]:
        """Per image: ``the person``, ``not the person`` or ``no face`` (which is not the person either)."""
        return [
            "no face" if d is None else "the person" if m else "not the person"
            for d, m in zip(self.distances, self.matches, strict=True)
        ]

    def summary(self) -> str:
        """The one line validation, test and ``likeness score`` print: the HW's three numbers and who is in it."""
        identity = (
            f"the person in {sum(self.matches)}/{self.images} "
            f"({self.face_model} {DISTANCE_METRIC} distance <= {self.threshold:.3f})"
        )
        if math.isnan(self.face_distance):
            return (
                f"no face in any image: face distance and CLIP score undefined, {identity}, "
                f"faceless {self.images}/{self.images}"
            )
        clip = "CLIP score skipped" if math.isnan(self.clip_score) else f"CLIP score {self.clip_score:.2f}"
        return (
            f"face distance {self.face_distance:.4f} ({self.rubric}), {identity}, "
            f"{clip}, faceless {self.faceless_count}/{self.images}"
        )

    def labels(self) -> list[str]:
        """One line per image for the validation grid: the verdict and the distance it was taken on."""
        out = []
        for distance, match in zip(self.distances, self.matches, strict=True):
            if distance is None:
                out.append("no face: not the person")
            else:
                sign = "<=" if match else ">"
                verdict = "the person" if match else "not the person"
                out.append(f"{verdict}: {distance:.3f} {sign} {self.threshold:.3f}")
        return out

    def passes(self, min_clip_score: float, max_faceless_fraction: float) -> bool:
        """The HW floors, scaled to the number of prompts: CLIP > min and faceless <= fraction of images."""
        allowed = math.floor(max_faceless_fraction * self.images + 1e-9)
        return (
            not math.isnan(self.face_distance)
            and (math.isnan(self.clip_score) or self.clip_score > min_clip_score)
            and self.faceless_count <= allowed
        )

    def as_metrics(self, prefix: str) -> dict[str, float]:
        """Loggable numbers; undefined ones (NaN) are left out rather than logged as 0.

        ``rubric_points`` only with the rubric's face model: elsewhere any number would be made up.
        """
        points = self.rubric_points
        values = {
            "face_distance": self.face_distance,
            "identity_match_rate": self.identity_match_rate,
            "clip_score": self.clip_score,
            "faceless_count": float(self.faceless_count),
            "faceless_rate": self.faceless_rate,
            # Points follow from the face distance: undefined with it.
            "rubric_points": math.nan if points is None or math.isnan(self.face_distance) else float(points),
        }
        return {f"{prefix}/{k}": v for k, v in values.items() if not math.isnan(v)}


# Scoring runs on rank 0 alone (the validation callback's reports are rank_zero_only): a torchmetrics sync on
# compute would wait forever for ranks that never score (a DDP deadlock, issue #8).
LOCAL = {"sync_on_compute": False}


class IdentityScorer:
    """Embeds the training photos once, then scores generated images against them.

    Who is the person is decided by the face model's verification threshold for the face distance's metric
    (deepface's ``euclidean_l2`` thresholds; in deepface 0.0.103 e.g. Dlib 0.40, GhostFaceNet 1.10).

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
        self.clip_model = clip_model
        face_model.check()  # a missing model or weights fails here, at start-up
        # The face model's own pair threshold for the face distance's metric decides who is the person.
        self.threshold = face_model.verification_threshold(DISTANCE_METRIC)
        # CLIP before the training photos are embedded: a CLIP that cannot load fails in seconds, not after
        # minutes of embedding (issue #11). It stays on the CPU: it must not take GPU memory from training.
        self.clip = ClipScore(clip_model, device="cpu", **LOCAL) if clip_model else None
        self.reference = ReferenceEmbeddings(face_model, cache_dir, include_faceless).compute(reference_paths)

    @property
    def settings(self) -> dict[str, object]:
        """What decides the numbers, for ``scores.json``."""
        return {
            "face_model": self.face_model.model_name,
            "face_detector": self.face_model.detector_backend,
            "distance_metric": DISTANCE_METRIC,
            "threshold": self.threshold,
            "clip_model": self.clip_model,
            "reference_faces": len(self.reference),
        }

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> IdentityScores:
        started = time.perf_counter()
        embeddings = self.face_model.embed(images)
        distance, faceless = FaceDistance(self.reference, **LOCAL), FacelessCount(**LOCAL)
        match = IdentityMatch(self.threshold, **LOCAL)
        distance.update(embeddings)
        faceless.update(embeddings)
        per_face = distance.per_face(embeddings)
        match.update(per_face)
        found = [e is not None for e in embeddings]
        face_seconds, started = time.perf_counter() - started, time.perf_counter()
        clip_scores: list[float | None] = [None] * len(images)
        if self.clip is not None and any(found):
            # The HW scored only the images in which a face was found. Per image, so that each row of
            # scores.csv has its own score and their mean is the reported one.
            faced = [i for i, f in enumerate(found) if f]
            values = self.clip.scores([images[i] for i in faced], [prompts[i] for i in faced])
            for i, value in zip(faced, values.tolist(), strict=True):
                clip_scores[i] = value
        kept = [c for c in clip_scores if c is not None]
        return IdentityScores(
            face_distance=float(distance.compute()) if any(found) else math.nan,
            clip_score=math.fsum(kept) / len(kept) if kept else math.nan,
            faceless_count=int(faceless.compute()["count"]),
            images=len(images),
            distances=per_face,
            matches=[match.is_match(d) for d in per_face],
            identity_match_rate=float(match.compute()),  # NaN without images
            threshold=self.threshold,
            face_model=self.face_model.model_name,
            clip_scores=clip_scores,
            seconds={"face": face_seconds, "clip": time.perf_counter() - started},
        )
