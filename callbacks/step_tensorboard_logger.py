"""TensorBoard for a run counted in optimizer steps: no ``epoch`` curve, no ``hp_metric`` placeholder (issue #10)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only


class StepTensorBoardLogger(TensorBoardLogger):
    """Lightning's TensorBoardLogger without the scalars that mean nothing here.

    Lightning adds ``epoch`` to every batch of logged metrics; a likeness run is planned in steps (an epoch is one
    pass over a few dozen photos), and TensorBoard sorted that curve first on its Scalars page, above the
    identity curves. ``hp_metric`` is off by default for the same reason (a -1 placeholder).

    Args:
        save_dir: folder the runs go under (``logs``).
        name: run name: ``<save_dir>/<name>/version_N``.
        version: run version; default: the next free ``version_N``.
        default_hp_metric: write TensorBoard's ``hp_metric`` placeholder.
        **kwargs: the other arguments of ``TensorBoardLogger``.
    """

    def __init__(
        self,
        save_dir: str = "logs",
        name: str | None = "likeness",
        version: int | str | None = None,
        default_hp_metric: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(save_dir, name=name, version=version, default_hp_metric=default_hp_metric, **kwargs)

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        metrics = {key: value for key, value in metrics.items() if key != "epoch"}
        if metrics:
            super().log_metrics(metrics, step)
