"""Identity metrics of NTU GenAI HW10: face distance, faceless images, CLIP score; and identity match rate.

Names are imported on first use, so ``import metrics`` stays cheap (no deepface, transformers, torch).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FaceModel": "metrics.face_model",
    "ReferenceEmbeddings": "metrics.reference_embeddings",
    "FaceDistance": "metrics.face_distance",
    "rubric_points": "metrics.face_distance",
    "IdentityMatch": "metrics.identity_match",
    "FacelessCount": "metrics.faceless_count",
    "ClipScore": "metrics.clip_score",
    "load_clip": "metrics.clip_score",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'metrics' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
