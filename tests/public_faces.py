"""Strangers' faces for the face-model tests: scikit-image's ``lfw_subset()``, padded so the detector finds them.
Imported by tests as ``from public_faces import lfw_faces`` (pytest puts ``tests/`` on the path); the demo's scoring
sets use the same faces (``datamodules.sample_photos``).
"""

from __future__ import annotations

import numpy as np

from datamodules.sample_photos import lfw_faces

__all__ = ["lfw_faces", "recomputed_verdicts"]


def recomputed_verdicts(scorer, images) -> list[bool]:
    """Whether each image is the person, recomputed from the raw embeddings and deepface's own threshold table
    (not the scorer's arithmetic): mean L2 distance of the unit embeddings to the unit references <= threshold."""
    from deepface.config.threshold import thresholds

    threshold = thresholds[scorer.face_model.model_name]["euclidean_l2"]
    units = scorer.reference / np.linalg.norm(scorer.reference, axis=1, keepdims=True)
    return [
        e is not None and np.mean(np.linalg.norm(units - e / np.linalg.norm(e), axis=1)) <= threshold
        for e in scorer.face_model.embed(images)
    ]
