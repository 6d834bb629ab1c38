"""What both paths of ``train_speed.py`` share: the settings measured and the step clock."""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch

UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
LR = 1e-4
SNR_GAMMA = 5.0
PROMPTS = [f"a photo of sks person, synthetic prompt {i}" for i in range(25)]  # --end-to-end validates the first 3


@dataclass(frozen=True)
class Setting:
    batch: int
    rank: int
    alpha: float
    text_encoder: bool


SETTINGS = {
    "hw": Setting(batch=2, rank=32, alpha=16.0, text_encoder=True),
    "unet-r4-b8": Setting(batch=8, rank=4, alpha=4.0, text_encoder=False),
    "unet-r4-b2": Setting(batch=2, rank=4, alpha=4.0, text_encoder=False),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock(L.Callback):
    """Step times (CUDA synchronised before each reading), gaps between step ends, and ``origin`` to first step;
    after ``synced_steps`` steps, the rest run without a sync and only their ends are marked (CUDA events), so the
    CPU may queue a step while the GPU still runs the last one, as in a real run: ``async`` figures.

    Called by hand in the plain loop; as a Lightning callback it times each optimizer step of a likeness run.
    """

    def __init__(self, device: torch.device, synced_steps: int | None = None) -> None:
        self.device, self.origin, self.begin = device, time.perf_counter(), 0.0
        self.synced_steps = synced_steps
        self.last: float | None = None
        self.first_step_s: float | None = None
        self.steps: list[float] = []
        self.gaps: list[float] = []
        self.ends: list[Any] = []  # unsynced steps: a CUDA event (a clock reading on a CPU) at each end

    def _synced(self) -> bool:
        return self.synced_steps is None or len(self.steps) < self.synced_steps

    def start(self) -> None:
        if self._synced():
            sync(self.device)
            self.begin = time.perf_counter()

    def stop(self) -> None:
        if not self._synced():
            if self.device.type == "cuda":
                self.ends.append(torch.cuda.Event(enable_timing=True))
                self.ends[-1].record()
            else:
                self.ends.append(time.perf_counter())
            return
        sync(self.device)
        now = time.perf_counter()
        self.steps.append(now - self.begin)
        if self.last is None:
            self.first_step_s = now - self.origin
        else:
            self.gaps.append(now - self.last)
        self.last = now

    def async_gaps(self) -> list[float]:
        """Seconds between the ends of consecutive unsynced steps (on the GPU's own clock)."""
        if self.device.type == "cuda" and self.ends:
            sync(self.device)
            return [a.elapsed_time(b) / 1000 for a, b in zip(self.ends, self.ends[1:], strict=False)]
        return [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)]

    def on_train_batch_start(self, *_: Any) -> None:
        self.start()

    def on_train_batch_end(self, *_: Any) -> None:
        self.stop()

    def summary(self, args: argparse.Namespace, setting: str, path: str, batch: int, **extra: Any) -> dict[str, Any]:
        """img/s from the median step after warm-up; gaps[i] runs from the end of step i to the end of step i + 1."""
        timed, gaps = self.steps[args.warmup :], self.gaps[max(args.warmup - 1, 0) :]
        median = statistics.median(timed) if timed else None
        # The median of the gaps: a validation or an epoch's end between two steps is one long gap among many.
        async_gaps = self.async_gaps()
        return {
            "setting": setting,
            "path": path,
            "batch": batch,
            "img_per_s": batch / median if median else None,
            "img_per_s_with_data": batch / statistics.median(gaps) if gaps else None,
            "img_per_s_async": batch / statistics.median(async_gaps) if async_gaps else None,
            "steps_async": len(async_gaps),
            "median_step_s": median,
            "steps_timed": len(timed),
            "first_step_s": self.first_step_s,
            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None,
            "step_s": [round(t, 5) for t in self.steps],
            **extra,
        }
