"""A single-file base model (original LDM layout, as downloaded from model sites) trains through train.py.

The file is the tiny diffusers model rewritten by ``ldm_layout`` (independent of the loader under test);
``model.model_config`` points at the diffusers folder for the configs and tokenizer, as a user does offline.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from ldm_layout import save_single_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from train import main


@pytest.fixture(scope="module")
def single_file(tiny_sd: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_single_file(tiny_sd, tmp_path_factory.mktemp("single") / "tiny-sd.safetensors")


def fit(demo_cli, log_dir: Path, *extra: str):
    """Two steps of configs/demo.yaml on the fixtures (``extra`` overrides, e.g. the base model)."""
    args = ["--trainer.max_steps=2", "--trainer.limit_val_batches=0", "--trainer.log_every_n_steps=1"]
    # No identity validation images (they cost more than the training here and are not what is tested).
    args += ["--validation.baseline=false", "--validation.at_end=false"]
    return main(demo_cli("fit", log_dir, *args, *extra))


def logged_losses(run_dir: Path) -> list[float]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [e.value for e in events.Scalars("train/loss")]


def saved_lora(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["state_dict"]


def test_single_file_base_model_trains_like_its_folder(
    single_file: Path, tiny_sd: Path, demo_cli, tmp_path: Path
) -> None:
    cli = fit(
        demo_cli,
        tmp_path / "file",
        f"--model.pretrained_model_name_or_path={single_file}",
        f"--model.model_config={tiny_sd}",
    )
    assert cli.model.base.source == str(single_file)  # the file was loaded, not the folder
    assert cli.trainer.global_step == 2
    run_dir = Path(cli.trainer.log_dir)
    losses = logged_losses(run_dir)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), losses

    lora = saved_lora(run_dir)
    assert set(lora) == cli.model.trainable_names() and any(k.startswith("text_encoder.") for k in lora)
    # peft starts every B at zero: a non-zero B is a LoRA weight that training moved.
    ups = {k: v for k, v in lora.items() if ".lora_B." in k}
    assert ups and all(v.abs().max() > 0 for v in ups.values()), [k for k, v in ups.items() if not v.any()]

    # The same run on the diffusers folder: same weights, seed and data, so the same LoRA to the bit.
    folder_run = fit(demo_cli, tmp_path / "folder")  # demo_cli's base model is the tiny_sd folder
    reference = saved_lora(Path(folder_run.trainer.log_dir))
    assert reference.keys() == lora.keys()
    for key in lora:
        assert torch.equal(lora[key], reference[key]), key
