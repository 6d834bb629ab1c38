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
    """Step times (CUDA synchronised before each reading), gaps between step ends, and ``origin`` to first step.

    Called by hand in the plain loop; as a Lightning callback it times each optimizer step of a likeness run.
    """

    def __init__(self, device: torch.device) -> None:
        self.device, self.origin, self.begin = device, time.perf_counter(), 0.0
        self.last: float | None = None
        self.first_step_s: float | None = None
        self.steps: list[float] = []
        self.gaps: list[float] = []

    def start(self) -> None:
        sync(self.device)
        self.begin = time.perf_counter()

    def stop(self) -> None:
        sync(self.device)
        now = time.perf_counter()
        self.steps.append(now - self.begin)
        if self.last is None:
            self.first_step_s = now - self.origin
        else:
            self.gaps.append(now - self.last)
        self.last = now

    def on_train_batch_start(self, *_: Any) -> None:
        self.start()

    def on_train_batch_end(self, *_: Any) -> None:
        self.stop()

    def summary(self, args: argparse.Namespace, setting: str, path: str, batch: int, **extra: Any) -> dict[str, Any]:
        """img/s from the median step after warm-up; gaps[i] runs from the end of step i to the end of step i + 1."""
        timed, gaps = self.steps[args.warmup :], self.gaps[max(args.warmup - 1, 0) :]
        median = statistics.median(timed) if timed else None
        return {
            "setting": setting,
            "path": path,
            "batch": batch,
            "img_per_s": batch / median if median else None,
            "img_per_s_with_data": batch / statistics.median(gaps) if gaps else None,
            "median_step_s": median,
            "steps_timed": len(timed),
            "first_step_s": self.first_step_s,
            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None,
            "step_s": [round(t, 5) for t in self.steps],
            **extra,
        }
