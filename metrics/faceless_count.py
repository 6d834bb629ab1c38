"""How many generated images have no face (NTU GenAI HW10's "faceless images")."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric


class FacelessCount(Metric):
    """Counts the images the face model found no face in (``None`` embeddings from ``FaceModel.embed``).

    ``compute()`` returns ``{"count": faceless images, "rate": count / images}`` (rate NaN before any
    image), ready for ``LightningModule.log_dict`` with a prefix.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("faceless", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, embeddings: Sequence[np.ndarray | Tensor | None]) -> None:
        """Add one embedding (or ``None`` for no face) per generated image."""
        self.faceless += sum(e is None for e in embeddings)
        self.total += len(embeddings)

    def compute(self) -> dict[str, Tensor]:
        """Faceless images so far, and their share of all images."""
        rate = self.faceless / self.total if self.total > 0 else torch.tensor(math.nan)
        return {"count": self.faceless.clone(), "rate": rate.to(torch.float32)}
