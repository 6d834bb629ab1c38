"""Strangers' faces for the face-model tests: scikit-image's ``lfw_subset()``, padded so the detector finds them.
Imported by tests as ``from public_faces import lfw_faces`` (pytest puts ``tests/`` on the path); the demo's scoring
sets use the same faces (``datamodules.sample_photos``).
"""

from __future__ import annotations

from datamodules.sample_photos import lfw_faces

__all__ = ["lfw_faces"]
