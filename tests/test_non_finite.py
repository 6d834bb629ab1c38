"""NaN and infinity: training stops (or skips) naming the step, and nothing non-finite is saved, resumed or exported."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from callbacks.checkpoint_export import main as export_main
from callbacks.non_finite_guard import NonFiniteGuard
from lightning_modules.finite import NonFiniteError
from train import main

QUIET = ["--validation.baseline=false", "--validation.every_n_steps=0", "--validation.at_end=false"]


class Line(L.LightningModule):
    """y = w x with a loss that is NaN at the optimizer steps in ``bad`` (1-based)."""

    def __init__(self, bad: set[int]) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(4))
        self.bad, self.seen = bad, []

    def training_step(self, batch, batch_idx):
        self.seen.append(self.w.detach().clone())
        loss = ((self.w * batch[0]).sum() - 1) ** 2
        return loss * float("nan") if self.global_step + 1 in self.bad else loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(16, 4)), batch_size=1)


def fit(module: Line, guard: NonFiniteGuard, steps: int, tmp_path: Path) -> None:
    trainer = L.Trainer(
        max_steps=steps, callbacks=[guard], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module)


def test_stop_names_the_first_bad_step_even_between_checks(tmp_path):
    module = Line(bad={3, 4})
    with pytest.raises(NonFiniteError, match="step 3 had a NaN"):
        fit(module, NonFiniteGuard(check_every_n_steps=100), 6, tmp_path)  # caught at the end of training


def test_skip_leaves_the_weights_of_a_bad_step_untouched(tmp_path):
    module = Line(bad={3})
    with pytest.warns(UserWarning, match="Step 3: the loss or a gradient is NaN"):
        fit(module, NonFiniteGuard(skip_steps=True), 6, tmp_path)
    w = module.seen  # weights before steps 1..6
    assert torch.equal(w[3], w[2])  # step 3 changed nothing
    assert not torch.equal(w[1], w[2]) and not torch.equal(w[4], w[3])  # steps 2 and 4 did update
    assert bool(torch.isfinite(module.w).all())


def test_skip_gives_up_after_too_many_in_a_row(tmp_path):
    with pytest.raises(NonFiniteError, match="3 steps in a row from step 2"), pytest.warns(UserWarning):
        fit(Line(bad={2, 3, 4, 5}), NonFiniteGuard(skip_steps=True, max_skipped_steps=2), 8, tmp_path)


def test_diverging_run_stops_and_writes_no_nan(demo_cli, tmp_path, capsys):
    args = [*QUIET, "--trainer.max_steps=4", "--checkpoint.every_n_train_steps=2", "--model.noise_offset=1e30"]
    with pytest.raises(SystemExit) as info:
        main(demo_cli("fit", tmp_path, *args))
    assert info.value.code != 0
    err = capsys.readouterr().err
    assert "step 1 had a NaN or infinite loss" in err and "Traceback" not in err
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("*.safetensors"))


@pytest.fixture(scope="module")
def nan_checkpoint(demo_cli, tmp_path_factory):
    """A good checkpoint of a short run, and a copy with one LoRA tensor set to NaN (as bit rot or a bad run)."""
    folder = tmp_path_factory.mktemp("nan-ckpt")
    cli = main(demo_cli("fit", folder, *QUIET, "--trainer.max_steps=2", "--export.on_checkpoint=false"))
    good = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(good, weights_only=True)
    name = sorted(checkpoint["state_dict"])[0]
    checkpoint["state_dict"][name][0] = float("nan")
    bad = folder / "bad.ckpt"
    torch.save(checkpoint, bad)
    return good, bad, name


def test_resume_refuses_non_finite_lora_tensors(demo_cli, nan_checkpoint, tmp_path, capsys):
    good, bad, name = nan_checkpoint
    with pytest.raises(SystemExit) as info:
        main(demo_cli("fit", tmp_path, *QUIET, "--trainer.max_steps=4", f"--ckpt_path={bad}"))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert name in err and "NaN or infinite" in err and "earlier checkpoint" in err


def test_export_refuses_non_finite_lora_tensors(nan_checkpoint, tmp_path, capsys):
    good, bad, name = nan_checkpoint
    with pytest.raises(SystemExit) as info:
        export_main([str(bad), "--out", str(tmp_path / "bad")])
    assert info.value.code == 2 and name in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    export_main([str(good), "--out", str(tmp_path / "good")])  # the good one still exports
    assert (tmp_path / "good" / "pytorch_lora_weights.safetensors").is_file()


def test_stop_message_names_only_a_checkpoint_on_disk(tmp_path):
    # Lightning sets last_model_path before saving: the save this guard stopped must not be named as the good one.
    last = tmp_path / "last.ckpt"
    trainer = SimpleNamespace(checkpoint_callback=SimpleNamespace(last_model_path=str(last)))
    guard = NonFiniteGuard(skip_steps=True, max_skipped_steps=2)
    assert "last saved: none yet" in guard._message(trainer, 3)
    last.write_bytes(b"a checkpoint")
    assert f"last saved: {last})" in guard._message(trainer, 3)
    skipped = guard._message(trainer, 3, skipped=True)
    assert "weights are still finite" in skipped and "skip_steps true" not in skipped
    assert "no longer usable" in guard._message(trainer, 3)
