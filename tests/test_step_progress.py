"""The training bar: redraws (which wait for the GPU) at most every refresh_seconds, img/s of training alone."""

from __future__ import annotations

import traceback

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from torch.utils.data import DataLoader, Dataset

import callbacks.step_progress as step_progress
from callbacks.identity_validation import IdentityValidation
from callbacks.step_progress import StepProgressBar
from lightning_modules.step_mean import StepMean
from train import main

STEP_SECONDS, LOAD_SECONDS, PAUSE_SECONDS = 0.1, 0.05, 30.0


class FakeClock:
    """``time.perf_counter`` for the bar: it moves only when the test says work happened."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Loading(Dataset):
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> torch.Tensor:
        self.clock.now += LOAD_SECONDS  # between batches: not training time
        return torch.full((2,), 1.0 + index % 3)  # losses differ between the micro-batches of a step


class Linear(L.LightningModule):
    def __init__(self, clock: FakeClock, log_loss: bool = True) -> None:
        super().__init__()
        self.layer, self.clock, self.losses, self.logged = torch.nn.Linear(2, 1), clock, [], []
        self.step_mean, self.log_loss = StepMean(), log_loss
        # Fixed weights: the same losses in every run (random ones could make a step's micro-batch losses nearly
        # equal, and the test below would no longer tell the step's mean from its last micro-batch).
        torch.nn.init.constant_(self.layer.weight, 0.25)
        torch.nn.init.zeros_(self.layer.bias)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.layer(batch).square().mean()
        self.losses.append(float(loss))
        # As LoRADiffusion: not prog_bar, the step's mean over its micro-batches.
        mean = self.step_mean.update(self.global_step, loss=loss)["loss"]
        self.logged.append(float(mean))
        if self.log_loss:
            self.log("train/loss", mean, batch_size=1)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        self.clock.now += STEP_SECONDS  # the step's own work

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Loading(self.clock), batch_size=None)  # one sample a step: one image a step


class Validation(L.Callback):
    """Stands in for IdentityValidation: a long pause in on_train_batch_end, after the bar's."""

    def __init__(self, clock: FakeClock, every: int) -> None:
        self.clock, self.every = clock, every

    def on_train_batch_end(self, trainer: L.Trainer, *_) -> None:
        if trainer.global_step % self.every == 0:
            self.clock.now += PAUSE_SECONDS


def fit(
    tmp_path, monkeypatch, bar: StepProgressBar, steps: int, accumulate: int = 1, log_loss: bool = True
) -> tuple[StepProgressBar, list[int]]:
    clock = FakeClock()
    monkeypatch.setattr(step_progress.time, "perf_counter", clock)
    drawn: list[int] = []  # the steps at which the bar read the metrics (a wait for the GPU each)
    read = TQDMProgressBar.get_metrics

    def counted(self, trainer, pl_module):
        drawn.append(trainer.global_step)
        return read(self, trainer, pl_module)

    monkeypatch.setattr(TQDMProgressBar, "get_metrics", counted)
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_model_summary=False,
        callbacks=[bar, Validation(clock, every=5)], default_root_dir=tmp_path, limit_val_batches=0,
        accumulate_grad_batches=accumulate,
    )  # fmt: skip
    bar.module = Linear(clock, log_loss)
    trainer.fit(bar.module)
    return bar, drawn


def test_bar_reads_the_loss_at_most_every_refresh_seconds_and_counts_training_time_only(tmp_path, monkeypatch):
    bar, drawn = fit(tmp_path, monkeypatch, StepProgressBar(refresh_seconds=0.5), steps=20)
    # A step and its loading take 0.15 s: after the first step, a redraw every 4th step (0.6 s >= 0.5 s), and
    # at once after a validation pause; the last step always draws.
    assert drawn[0] == 1 and drawn[-1] == 20
    assert len(drawn) < 20 / 2
    assert all(b > a for a, b in zip(drawn, drawn[1:], strict=False))
    # img/s: one image per 0.1 s of training; neither the loading (0.05 s a step) nor the 30 s validations count.
    assert bar.images_per_second() == pytest.approx(1 / STEP_SECONDS)
    postfix = bar.train_progress_bar.postfix
    assert "img/s=10" in postfix and "train/loss=" in postfix and "v_num" not in postfix


def test_refresh_seconds_zero_draws_every_step(tmp_path, monkeypatch):
    bar, drawn = fit(tmp_path, monkeypatch, StepProgressBar(refresh_seconds=0), steps=6)
    assert drawn == [1, 2, 3, 4, 5, 6]
    assert bar.images_per_second() == pytest.approx(1 / STEP_SECONDS)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_bar_counts_optimizer_steps_and_shows_the_loss_as_logged(tmp_path, monkeypatch, accumulate):
    bar, drawn = fit(tmp_path, monkeypatch, StepProgressBar(refresh_seconds=0), steps=3, accumulate=accumulate)
    assert drawn == [1, 2, 3]  # once a step, after its last micro-batch: never in the middle of one
    # One image a micro-batch, 0.1 s of work an optimizer step: `accumulate` images per 0.1 s.
    assert bar.images_per_second() == pytest.approx(accumulate / STEP_SECONDS)
    shown = dict(item.split("=") for item in bar.train_progress_bar.postfix.split(", "))
    # What TensorBoard gets for the step: the mean over its micro-batches, not the last micro-batch's loss.
    losses = bar.module.losses
    assert len(losses) == 3 * accumulate
    step_mean = sum(losses[-accumulate:]) / accumulate
    assert float(shown["train/loss"]) == pytest.approx(step_mean, rel=1e-2) == bar.module.logged[-1]
    if accumulate > 1:
        assert abs(losses[-1] - step_mean) > 0.05 * step_mean  # the two differ: the test tells them apart


def test_a_module_that_logs_no_loss_gets_its_steps_output_on_the_bar(tmp_path, monkeypatch):
    bar, _ = fit(tmp_path, monkeypatch, StepProgressBar(refresh_seconds=0), steps=3, accumulate=2, log_loss=False)
    shown = dict(item.split("=") for item in bar.train_progress_bar.postfix.split(", "))
    # Lightning hands the bar the backpropagated loss, divided by the micro-batches of a step: scaled back.
    assert float(shown["train/loss"]) == pytest.approx(bar.module.losses[-1], rel=1e-2)


def test_cli_puts_the_bar_before_validation_and_checkpoints(demo_cli, tmp_path):
    cli = main(demo_cli("fit", tmp_path, "--trainer.max_steps=1", "--trainer.enable_progress_bar=true"))
    names = [type(callback).__name__ for callback in cli.trainer.callbacks]
    assert isinstance(cli.trainer.callbacks[0], StepProgressBar), names
    assert names.count("StepProgressBar") == 1 and "TQDMProgressBar" not in names
    assert any(isinstance(callback, IdentityValidation) for callback in cli.trainer.callbacks)


def test_a_likeness_fit_reads_nothing_from_the_device_on_steps_the_bar_does_not_draw(demo_cli, tmp_path, monkeypatch):
    """On a GPU each ``Tensor.item`` waits for it: a step that reads one cannot be queued while the last one runs.
    With the bar drawing steps 1 and 12 only, and the NaN check, logging and validation not due, no other step
    may read anything (a loss logged with ``prog_bar`` would be read after every one)."""
    from lightning_modules.lora_diffusion import LoRADiffusion

    step, reads, item = [0], {}, torch.Tensor.item

    def counted(tensor: torch.Tensor):
        # Host-side by construction on any device: the data loader's draws, and the CPU step counter that the
        # optimizer's CPU kernel reads (on a GPU the fused kernel keeps it on the device and reads nothing).
        host = ("torch/utils/data/", "torch/optim/", "datamodules/")
        if not any(
            part in frame.filename.replace("\\", "/") for frame in traceback.extract_stack()[:-1] for part in host
        ):
            reads[step[0]] = reads.get(step[0], 0) + 1
        return item(tensor)

    def batch_start(module: LoRADiffusion, batch, batch_idx: int) -> None:
        step[0] = module.trainer.global_step + 1

    monkeypatch.setattr(torch.Tensor, "item", counted)
    monkeypatch.setattr(LoRADiffusion, "on_train_batch_start", batch_start, raising=False)
    monkeypatch.setattr(StepProgressBar, "_due", lambda self, trainer, now: trainer.global_step in (1, 12))
    args = demo_cli("fit", tmp_path, "--trainer.max_steps=12", "--trainer.enable_progress_bar=true")
    args += ["--validation.every_n_steps=100", "--nan_guard.check_every_n_steps=100", "--trainer.log_every_n_steps=100"]
    assert main(args).trainer.global_step == 12
    assert {s for s in reads if 1 <= s <= 12} <= {1, 12}, reads
    assert reads.get(12, 0) >= 1  # the drawn step read its loss (the counting works)
