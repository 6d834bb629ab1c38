"""The mean of logged values over the micro-batches of one optimizer step (gradient accumulation)."""

from __future__ import annotations

import torch


class StepMean:
    """Running means of named values, restarted at each new optimizer step.

    With ``accumulate_grad_batches k`` Lightning logs a step's metrics once, at its last micro-batch, and an
    ``on_step`` value is the last one logged: ``train/loss`` showed one micro-batch in k, so its curve was k times
    noisier than the loss that trained (the mean of the k micro-batch losses: each is divided by k before its
    backward). Logging this mean after every micro-batch makes the value logged at the boundary the step's loss.
    """

    def __init__(self) -> None:
        self._step: int | None = None
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}

    def update(self, step: int, **values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Adds ``values`` of a micro-batch of optimizer step ``step``; returns each value's mean over the step so
        far. Tensors stay on their device: no wait for the GPU."""
        if step != self._step:
            self._step, self._sums, self._counts = step, {}, {}
        for name, value in values.items():
            value = value.detach()
            self._sums[name] = self._sums[name] + value if name in self._sums else value
            self._counts[name] = self._counts.get(name, 0) + 1
        return {name: self._sums[name] / self._counts[name] for name in values}
