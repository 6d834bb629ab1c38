"""LoraExport writes loadable LoRA files beside every checkpoint and at the end of a real (tiny) fit."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from diffusers import StableDiffusionPipeline
from lightning.pytorch.callbacks import ModelCheckpoint
from peft import LoraConfig
from safetensors import safe_open
from torch.utils.data import DataLoader, TensorDataset

from callbacks.lora_export import LoraExport
from lightning_modules.tiny_sd import save_tiny_sd

CAPTIONS = ["a photo of sks person, smiling", "sks person, outdoors"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


def _inputs(text_encoder_dim: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 40, (1, 8), generator=g)
    return ids, torch.randn(1, 4, 32, 32, generator=g), torch.tensor([100])


class TinyLoRA(L.LightningModule):
    """The attributes LoraExport reads, on the tiny model; the loss pulls the UNet output to zero."""

    def __init__(self, pretrained_model_name_or_path: str, train_text_encoder: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        pipe = StableDiffusionPipeline.from_pretrained(pretrained_model_name_or_path)
        self.unet, self.text_encoder = (
            pipe.unet.requires_grad_(False),
            pipe.text_encoder.requires_grad_(False),
        )
        self.unet.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        if train_text_encoder:
            # All four projections: diffusers' kohya loader cannot read a text-encoder LoRA without out_proj.
            te_targets = ["q_proj", "k_proj", "v_proj", "out_proj"]
            self.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=8, target_modules=te_targets))
        with torch.no_grad():  # B starts at zero; a non-zero LoRA makes the checks below meaningful
            for name, param in self.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.1)

    def forward(self) -> torch.Tensor:
        ids, sample, t = _inputs(self.text_encoder.config.hidden_size)
        return self.unet(sample, t, self.text_encoder(ids)[0]).sample

    def training_step(self, batch, batch_idx):
        return self().pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self().pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5)


class TinyData(L.LightningDataModule):
    def __init__(self, resolution: int = 64, batch_size: int = 1) -> None:
        super().__init__()
        self.save_hyperparameters()

    @property
    def captions(self) -> list[str]:
        return CAPTIONS

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(8, 1)), batch_size=1)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(1, 1)), batch_size=1)


def _fit(base: Path, root: Path, train_text_encoder: bool) -> tuple[L.Trainer, TinyLoRA]:
    module = TinyLoRA(str(base), train_text_encoder)
    trainer = L.Trainer(
        max_steps=3, accelerator="cpu", default_root_dir=root, logger=False, enable_progress_bar=False,
        enable_model_summary=False, val_check_interval=3, num_sanity_val_steps=0,
        callbacks=[ModelCheckpoint(root / "ckpt", every_n_train_steps=2, save_top_k=-1), LoraExport("me")],
    )  # fmt: skip
    trainer.fit(module, datamodule=TinyData())
    return trainer, module


@pytest.mark.parametrize("train_text_encoder", [True, False])
def test_exports_beside_checkpoints_and_at_the_end(base, tmp_path, train_text_encoder):
    trainer, module = _fit(base, tmp_path, train_text_encoder)
    step_dir, final_dir = tmp_path / "ckpt" / "lora" / "step-2", tmp_path / "lora" / "final"
    for folder in (step_dir, final_dir):
        assert {p.name for p in folder.iterdir()} == {
            "pytorch_lora_weights.safetensors",
            "me.safetensors",
            "README.md",
        }

    # The final files reproduce the trained module in a fresh pipeline (diffusers and kohya files alike).
    with torch.no_grad():
        trained = module()
    for weight_name in ("pytorch_lora_weights.safetensors", "me.safetensors"):
        pipe = StableDiffusionPipeline.from_pretrained(base)
        pipe.load_lora_weights(final_dir, weight_name=weight_name)
        ids, sample, t = _inputs(pipe.text_encoder.config.hidden_size)
        with torch.no_grad():
            got = pipe.unet(sample, t, pipe.text_encoder(ids)[0]).sample
        torch.testing.assert_close(got, trained, atol=1e-5, rtol=1e-5)

    with safe_open(str(step_dir / "me.safetensors"), "pt") as f:
        step_meta, step_keys = f.metadata(), set(f.keys())
        step_tensor = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    with safe_open(str(final_dir / "me.safetensors"), "pt") as f:
        final_meta = f.metadata()
        final_tensor = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert (step_meta["ss_steps"], final_meta["ss_steps"]) == ("2", str(trainer.global_step))
    assert final_meta["ss_resolution"] == "(64, 64)" and final_meta["ss_num_train_images"] == "2"
    assert any(k.startswith("lora_te_") for k in step_keys) == train_text_encoder
    # The checkpoint export is a snapshot: training went on and changed the LoRA afterwards.
    assert any(not torch.equal(step_tensor[k], final_tensor[k]) for k in step_keys if k.endswith("up.weight"))
    assert json.loads(final_meta["ss_tag_frequency"])["me"]["sks person"] == 1

    card = (final_dir / "README.md").read_text()
    assert str(base) in card and f"{float(trainer.callback_metrics['val/loss']):.4g}" in card


def test_refuses_a_module_without_lora(base, tmp_path):
    module = TinyLoRA(str(base), train_text_encoder=False)
    module.unet.delete_adapters("default")
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, default_root_dir=tmp_path,
                        enable_progress_bar=False, callbacks=[LoraExport()])  # fmt: skip
    with pytest.raises(ValueError, match="peft LoRA adapter"):
        trainer.fit(module, datamodule=TinyData())
