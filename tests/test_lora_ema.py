"""LoraEMA: the EMA of the LoRA weights follows its formula, resumes bit for bit, and is what checkpoints, LoRA files
and in-run consumers (validation) get; decay 0 is a run without it.

The runs are LoRADiffusion on the tiny model with a Trainer built here (seconds, not the CLI's minute); the reference
EMA is recomputed in float64 from the live weights a recording callback saw after every optimizer step.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors import safe_open
from torch.utils.data import DataLoader

from callbacks.checkpoint_export import export_checkpoint
from callbacks.lora_ema import LoraEMA, ema_weights
from callbacks.lora_export import LoraExport
from lightning_modules.lora_diffusion import LoRADiffusion
from lora_files.lora_formats import DIFFUSERS_WEIGHT_NAME, export_lora

DECAY, START_STEP = 0.2, 1  # with warmup: step 1 copies, then min(0.2, 2/11) = 0.18, then 0.2, 0.2
PROBE_STEP = 3  # a consumer swaps the EMA in at this step, and saves checkpoints as IdentityValidation does


def adamw(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-2)  # a large step: live and EMA weights differ far beyond float32 noise


class TwoBatches(L.LightningDataModule):
    """Two fixed batches an epoch (a resume at an even step starts an epoch, so no data order is involved)."""

    def __init__(self, resolution: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters()
        g = torch.Generator().manual_seed(0)
        self.items = [
            {
                "pixel_values": torch.rand(3, 64, 64, generator=g) * 2 - 1,
                "input_ids": torch.randint(0, 40, (8,), generator=g),
            }
            for _ in range(2)
        ]

    @property
    def captions(self) -> list[str]:
        return ["a photo of sks person", "sks person, outdoors"]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.items, batch_size=1)


class Record(L.Callback):
    """The live LoRA weights after every optimizer step, and what a consumer sees inside ``ema_weights``.

    Listed before LoraEMA: at PROBE_STEP its batch-end hook runs before the EMA's own (as a validation might).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.live: dict[int, dict[str, torch.Tensor]] = {}
        self.inside: dict[str, torch.Tensor] = {}

    @staticmethod
    def weights(pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_train_start(self, trainer, pl_module) -> None:
        self.live[trainer.global_step] = self.weights(pl_module)

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.live[trainer.global_step] = self.weights(pl_module)
        if trainer.global_step == PROBE_STEP:
            with ema_weights(trainer):
                self.inside = self.weights(pl_module)
                trainer.save_checkpoint(self.folder / "inside.ckpt")
            trainer.save_checkpoint(self.folder / "best_identity.ckpt")  # as IdentityValidation saves it


def fit(tiny_sd: Path, root: Path, callbacks: list[L.Callback], steps: int = 4, ckpt_path: Path | None = None):
    torch.manual_seed(0)  # the same LoRA init in every run
    module = LoRADiffusion(str(tiny_sd), lora_rank=4, lora_alpha=2, train_text_encoder=True, optimizer=adamw)
    checkpoints = ModelCheckpoint(
        root / "checkpoints", filename="step{step:06d}", auto_insert_metric_name=False,
        every_n_train_steps=2, save_top_k=-1, save_last=True,
    )  # fmt: skip
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, default_root_dir=root, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[*callbacks, LoraExport("me"), checkpoints],
    )  # fmt: skip
    trainer.fit(module, datamodule=TwoBatches(), ckpt_path=ckpt_path)
    return trainer, module


def hand_ema(live: dict[int, dict[str, torch.Tensor]], upto: int) -> dict[str, torch.Tensor]:
    """ema = w_0, then after step s: ema = w_s up to START_STEP, else d ema + (1 - d) w_s with d as documented."""
    ema = {k: v.double() for k, v in live[0].items()}
    for step in range(1, upto + 1):
        n = step - START_STEP
        d = 0.0 if n <= 0 else min(DECAY, (1 + n) / (10 + n))
        ema = {k: d * ema[k] + (1 - d) * live[step][k].double() for k in ema}
    return {k: v.float() for k, v in ema.items()}


def saved(path: Path) -> dict:
    return torch.load(path, weights_only=True, map_location="cpu")


def assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> None:
    """``got`` is ``want`` up to float32 rounding, and ``other`` (the live weights) is far from both."""
    assert got.keys() == want.keys() and got
    for key in got:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-5, msg=key)
    assert max((got[k] - other[k]).abs().max() for k in got) > 1e-3


def read_files(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out[path.name] = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    return out


def export_weights(module: LoRADiffusion, weights: dict[str, torch.Tensor], folder: Path) -> dict[str, dict]:
    """The LoRA files of ``module`` holding ``weights``, written by export_lora directly (no callback involved)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name in weights:
                p.copy_(weights[name])
    export_lora(folder, module.unet, module.text_encoder, name="me-step000004", base_model="x", steps=4, resolution=64)
    return read_files(folder)


@pytest.fixture(scope="module")
def ema_run(tiny_sd, tmp_path_factory):
    root = tmp_path_factory.mktemp("ema")
    record = Record(root)
    trainer, module = fit(tiny_sd, root, [record, LoraEMA(decay=DECAY, start_step=START_STEP, warmup=True)])
    return root, record, trainer, module


def test_settings_outside_their_range_are_refused():
    for kwargs, setting in (
        ({"decay": 1.0}, "ema.decay"),
        ({"decay": -0.5}, "ema.decay"),
        ({"decay": float("nan")}, "ema.decay"),
        ({"start_step": -1}, "ema.start_step"),
        ({"device": "cuda"}, "ema.device"),
    ):
        with pytest.raises(ValueError, match=setting):
            LoraEMA(**kwargs)


@pytest.mark.slow
def test_ema_follows_its_formula_in_checkpoints_files_and_validation(ema_run, tmp_path):
    root, record, trainer, module = ema_run
    live = record.live
    assert sorted(live) == [0, 1, 2, 3, 4]
    # The module goes on with the live weights: the EMA was swapped in and out again, bit for bit.
    for name, p in module.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.detach(), live[4][name]), name

    # Checkpoints: the state_dict is the EMA of that step, the callback's state the live weights.
    for path, step in ((root / "checkpoints" / "step000002.ckpt", 2), (root / "checkpoints" / "last.ckpt", 4)):
        checkpoint = saved(path)
        assert_close(checkpoint["state_dict"], hand_ema(live, step), live[step])
        state = checkpoint["callbacks"]["LoraEMA"]
        assert state["live"].keys() == live[step].keys()
        assert all(torch.equal(state["live"][k], live[step][k]) for k in live[step])

    # Validation during fit (ema_weights) and best_identity.ckpt, saved inside or outside it, at PROBE_STEP.
    want = hand_ema(live, PROBE_STEP)
    assert_close(record.inside, want, live[PROBE_STEP])
    for name in ("inside.ckpt", "best_identity.ckpt"):
        checkpoint = saved(root / name)
        assert_close(checkpoint["state_dict"], want, live[PROBE_STEP])
        assert all(torch.equal(v, live[PROBE_STEP][k]) for k, v in checkpoint["callbacks"]["LoraEMA"]["live"].items())

    # The exported LoRA files (diffusers and kohya) hold the EMA: the files export_lora writes from the hand EMA.
    got = read_files(root / "lora" / "final")
    want_files = export_weights(module, hand_ema(live, 4), tmp_path / "ema")
    live_files = export_weights(module, live[4], tmp_path / "live")
    assert got.keys() == want_files.keys() == {DIFFUSERS_WEIGHT_NAME, "me-step000004.safetensors"}
    for file in got:
        assert_close(got[file], want_files[file], live_files[file])
    card = (root / "lora" / "final" / "README.md").read_text()
    assert "exponential moving average (EMA)" in card and "decay 0.2" in card and "| ema_start_step | 1 |" in card


@pytest.mark.slow
def test_likeness_export_of_an_ema_checkpoint_writes_the_ema(ema_run, tmp_path):
    root, *_ = ema_run
    files = export_checkpoint(root / "checkpoints" / "last.ckpt", tmp_path / "out", name="me")
    exported, callback = read_files(tmp_path / "out"), read_files(root / "lora" / "final")
    assert exported.keys() == callback.keys()
    for file in exported:
        assert all(torch.equal(exported[file][k], callback[file][k]) for k in callback[file]), file
    assert "exponential moving average (EMA)" in files["model_card"].read_text()


@pytest.mark.slow
def test_resume_continues_live_and_ema_weights_bit_for_bit(ema_run, tiny_sd, tmp_path):
    root, record, *_ = ema_run
    ema = LoraEMA(decay=DECAY, start_step=START_STEP, warmup=True)
    trainer, module = fit(tiny_sd, tmp_path, [ema], ckpt_path=root / "checkpoints" / "step000002.ckpt")
    assert trainer.global_step == 4
    straight, resumed = saved(root / "checkpoints" / "last.ckpt"), saved(tmp_path / "checkpoints" / "last.ckpt")
    assert straight["state_dict"].keys() == resumed["state_dict"].keys()
    for key, value in straight["state_dict"].items():  # the EMA
        assert torch.equal(resumed["state_dict"][key], value), key
    for key, value in straight["callbacks"]["LoraEMA"]["live"].items():
        assert torch.equal(resumed["callbacks"]["LoraEMA"]["live"][key], value), key
    for name, p in module.named_parameters():  # the resumed run trained on from the live weights, not the EMA
        if p.requires_grad:
            assert torch.equal(p.detach(), record.live[4][name]), name


@pytest.mark.slow
def test_decay_zero_is_a_run_without_the_callback(ema_run, tiny_sd, tmp_path):
    _, record, *_ = ema_run
    fit(tiny_sd, tmp_path / "off", [LoraEMA(decay=0.0)], steps=2)
    fit(tiny_sd, tmp_path / "none", [], steps=2)
    off, none = saved(tmp_path / "off/checkpoints/last.ckpt"), saved(tmp_path / "none/checkpoints/last.ckpt")
    assert "LoraEMA" not in off["callbacks"]
    assert off["state_dict"].keys() == none["state_dict"].keys() == record.live[2].keys()
    for key, value in none["state_dict"].items():
        # ... and the EMA run trained the same live weights: the EMA never touches training.
        assert torch.equal(off["state_dict"][key], value) and torch.equal(record.live[2][key], value), key
    off_files, none_files = read_files(tmp_path / "off/lora/final"), read_files(tmp_path / "none/lora/final")
    assert off_files.keys() == none_files.keys()
    for file in off_files:
        assert all(torch.equal(off_files[file][k], v) for k, v in none_files[file].items()), file
    assert "EMA" not in (tmp_path / "off/lora/final/README.md").read_text()
