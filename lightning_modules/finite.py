"""What counts as a usable weight: finite. Shared by training, checkpoints, resume and export (issue #8)."""

from __future__ import annotations

from collections.abc import Mapping

import torch


class NonFiniteError(ValueError):
    """A loss, gradient or weight is NaN or infinite; the message names the step or the tensors."""


def non_finite(tensors: Mapping[str, object]) -> list[str]:
    """Names of the floating-point tensors in ``tensors`` that hold a NaN or an infinity."""
    return [
        name
        for name, value in tensors.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]


def check_finite(tensors: Mapping[str, object], what: str, advice: str) -> None:
    """Raise :class:`NonFiniteError` naming the non-finite tensors of ``what`` (up to 10) and what to do."""
    bad = non_finite(tensors)
    if bad:
        shown = "\n  ".join(bad[:10]) + (f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise NonFiniteError(f"{what} has {len(bad)} tensor(s) with NaN or infinite values:\n  {shown}\n{advice}")
