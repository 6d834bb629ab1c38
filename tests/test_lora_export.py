"""LoraExport writes loadable LoRA files beside every checkpoint and at the end of a real (tiny) fit, and
``likeness export CKPT`` writes the same files from a train.py checkpoint afterwards."""

from __future__ import annotations

import errno
import json
import shutil
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from diffusers import StableDiffusionPipeline
from lightning.pytorch.callbacks import ModelCheckpoint
from peft import LoraConfig
from safetensors import safe_open
from torch.utils.data import DataLoader, TensorDataset

from callbacks.checkpoint_export import main as export_main
from callbacks.lora_export import LoraExport
from lightning_modules.lora_diffusion import LoRADiffusion
from lora_files.lora_formats import DIFFUSERS_WEIGHT_NAME
from stable_diffusion.tiny_sd import save_tiny_sd
from train import main as train_main

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
    # Step folders are named as the step checkpoints (step000002.ckpt); every kohya file has its own A1111 alias.
    step_dir, final_dir = tmp_path / "ckpt" / "lora" / "step000002", tmp_path / "lora" / "final"
    last = f"me-step{trainer.global_step:06d}.safetensors"
    for folder, kohya in ((step_dir, "me-step000002.safetensors"), (final_dir, last)):
        assert {p.name for p in folder.iterdir()} == {"pytorch_lora_weights.safetensors", kohya, "README.md"}

    # The final files reproduce the trained module in a fresh pipeline (diffusers and kohya files alike).
    with torch.no_grad():
        trained = module()
    for weight_name in ("pytorch_lora_weights.safetensors", last):
        pipe = StableDiffusionPipeline.from_pretrained(base)
        pipe.load_lora_weights(final_dir, weight_name=weight_name)
        ids, sample, t = _inputs(pipe.text_encoder.config.hidden_size)
        with torch.no_grad():
            got = pipe.unet(sample, t, pipe.text_encoder(ids)[0]).sample
        torch.testing.assert_close(got, trained, atol=1e-5, rtol=1e-5)

    with safe_open(str(step_dir / "me-step000002.safetensors"), "pt") as f:
        step_meta, step_keys = f.metadata(), set(f.keys())
        step_tensor = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    with safe_open(str(final_dir / last), "pt") as f:
        final_meta = f.metadata()
        final_tensor = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert (step_meta["ss_steps"], final_meta["ss_steps"]) == ("2", str(trainer.global_step))
    assert final_meta["ss_resolution"] == "(64, 64)" and final_meta["ss_num_train_images"] == "2"
    assert any(k.startswith("lora_te_") for k in step_keys) == train_text_encoder
    # The checkpoint export is a snapshot: training went on and changed the LoRA afterwards.
    assert any(not torch.equal(step_tensor[k], final_tensor[k]) for k in step_keys if k.endswith("up.weight"))
    assert (step_meta["ss_output_name"], final_meta["ss_output_name"]) == ("me-step000002", Path(last).stem)
    assert json.loads(final_meta["ss_tag_frequency"])[Path(last).stem]["sks person"] == 1

    card = (final_dir / "README.md").read_text()
    assert str(base) in card and f"{float(trainer.callback_metrics['val/loss']):.4g}" in card


def test_refuses_a_module_without_lora(base, tmp_path):
    module = TinyLoRA(str(base), train_text_encoder=False)
    module.unet.delete_adapters("default")
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, default_root_dir=tmp_path,
                        enable_progress_bar=False, callbacks=[LoraExport()])  # fmt: skip
    with pytest.raises(ValueError, match="peft LoRA adapter"):
        trainer.fit(module, datamodule=TinyData())


# ---------------------------------------------------------------------------------------------------------
# likeness export CKPT, on a checkpoint of train.py
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_run(demo_cli, tmp_path_factory) -> Path:
    """A 2-step train.py fit of configs/demo.yaml; a large learning rate so the LoRA clearly moves."""
    cli = train_main(
        demo_cli(
            "fit",
            tmp_path_factory.mktemp("cli_run"),
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=0",
            "--model.optimizer.init_args.lr=0.05",
            "--model.lr_warmup_steps=0",
            "--export.name=me",
            "--validation.baseline=false",  # no identity validation images: not what is tested here
            "--validation.at_end=false",
        )
    )
    return Path(cli.trainer.log_dir)


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def test_command_writes_what_the_callback_wrote(cli_run, capsys):
    export_main([str(cli_run / "checkpoints" / "last.ckpt")])
    folder = cli_run / "checkpoints" / "lora" / "last"  # the default: <ckpt dir>/lora/<ckpt stem>
    assert str(folder / DIFFUSERS_WEIGHT_NAME) in capsys.readouterr().out
    callback_folder = cli_run / "lora" / "final"  # LoraExport at the end of training, also step 2
    # "me": the run's export.name, from the checkpoint; step 2 is the last step.
    for name in (DIFFUSERS_WEIGHT_NAME, "me-step000002.safetensors"):
        (meta, tensors), (want_meta, want_tensors) = _read(folder / name), _read(callback_folder / name)
        assert tensors.keys() == want_tensors.keys() and tensors
        for key in tensors:
            assert torch.equal(tensors[key], want_tensors[key]), key
        for when in ("ss_training_finished_at", "modelspec.date"):  # the export's own time
            meta.pop(when, None), want_meta.pop(when, None)
        assert meta == want_meta
    kohya_meta = _read(folder / "me-step000002.safetensors")[0]
    assert kohya_meta["ss_steps"] == "2"
    # The run's seed (configs/demo.yaml: seed_everything 1126) and its rate, as kohya records them.
    assert (kohya_meta["ss_seed"], kohya_meta["ss_unet_lr"], kohya_meta["ss_learning_rate"]) == ("1126", "0.05", "0.05")
    # Same settings, steps, captions and base model; neither has validation metrics (none ran).
    card = (folder / "README.md").read_text()
    assert card == (callback_folder / "README.md").read_text()
    # Once, as width x height (demo_cli trains on 32 px photos).
    assert card.count("| resolution |") == 1 and "| resolution | 32x32 |" in card


# Lightning lists every frozen weight a LoRA-only checkpoint lacks; expected, see LoRADiffusion.on_save_checkpoint.
@torch.no_grad()
def test_exported_file_reproduces_the_checkpoint(cli_run, tiny_sd, tmp_path):
    ckpt = cli_run / "checkpoints" / "last.ckpt"
    export_main([str(ckpt), "--out", str(tmp_path / "out"), "--name", "other"])
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        DIFFUSERS_WEIGHT_NAME,
        "other-step000002.safetensors",
        "README.md",
    }
    # Again under its own name: nothing to say. Under another: the earlier kohya file stays and is named.
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*(state_dict|Found keys|missing).*")
        export_main([str(ckpt), "--out", str(tmp_path / "out"), "--name", "other"])
    with pytest.warns(UserWarning, match=r"also holds 1 LoRA file\(s\) of earlier exports \(other-step000002"):
        export_main([str(ckpt), "--out", str(tmp_path / "out"), "--name", "third"])
    (tmp_path / "out" / "third-step000002.safetensors").unlink()

    module = LoRADiffusion.load_from_checkpoint(ckpt, map_location="cpu").eval()
    saved = torch.load(ckpt, weights_only=True, map_location="cpu")["state_dict"]
    got = module.state_dict()
    assert all(torch.equal(got[k], v) for k, v in saved.items())  # the reference holds the checkpoint's LoRA

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, module.tokenizer.vocab_size, (2, 12), generator=g)
    sample, t = torch.randn(2, 4, 32, 32, generator=g), torch.tensor([20, 700])

    def outputs(text_encoder, unet) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = text_encoder(ids)[0]
        return hidden, unet(sample, t, hidden).sample

    want = outputs(module.text_encoder, module.unet)
    plain = StableDiffusionPipeline.from_pretrained(tiny_sd)
    base = outputs(plain.text_encoder, plain.unet)
    # The LoRA changes both models well beyond the tolerance below, so matching it means something.
    assert all((w - b).abs().max() > 1e-3 for w, b in zip(want, base, strict=True))
    plain.load_lora_weights(tmp_path / "out", weight_name=DIFFUSERS_WEIGHT_NAME)
    for got_part, want_part in zip(outputs(plain.text_encoder, plain.unet), want, strict=True):
        torch.testing.assert_close(got_part, want_part, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["missing", "folder", "lora_file", "other_checkpoint"])
def test_command_refuses_what_is_not_a_checkpoint(kind, cli_run, tmp_path, capsys):
    paths = {
        "missing": tmp_path / "nowhere.ckpt",
        "folder": cli_run / "checkpoints",
        "lora_file": cli_run / "lora" / "final" / "me-step000002.safetensors",
        "other_checkpoint": tmp_path / "other.ckpt",
    }
    torch.save({"state_dict": {"w": torch.zeros(1)}, "epoch": 0}, paths["other_checkpoint"])
    says = {
        "missing": "no such checkpoint file",
        "folder": "is a folder; pass one checkpoint file in it (.ckpt files there: last.ckpt",
        "lora_file": "not a PyTorch checkpoint",
        "other_checkpoint": "not a likeness checkpoint",
    }
    with pytest.raises(SystemExit) as info:
        export_main([str(paths[kind])])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert says[kind] in err and str(paths[kind]) in err and "Traceback" not in err


def test_command_base_model_that_moved(cli_run, tiny_sd, tmp_path, capsys, monkeypatch):
    moved = shutil.copytree(tiny_sd, tmp_path / "moved-sd")
    ckpt = cli_run / "checkpoints" / "last.ckpt"
    monkeypatch.chdir(tmp_path)  # --base-model given relative: the card names it absolute, as a run saves it
    export_main([str(ckpt), "--out", str(tmp_path / "out"), "--base-model", "moved-sd"])
    assert f"base_model: {moved}\n" in (tmp_path / "out" / "README.md").read_text()
    with pytest.raises(SystemExit) as info:
        export_main([str(ckpt), "--out", str(tmp_path / "out2"), "--base-model", str(tmp_path / "gone")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"--base-model {tmp_path / 'gone'}: no such file or folder" in err
    # A run whose base model has since moved: the error names the option that fixes it, not a training setting.
    saved = torch.load(ckpt, weights_only=True)
    saved["hyper_parameters"]["pretrained_model_name_or_path"] = str(tmp_path / "old-place")
    torch.save(saved, tmp_path / "moved.ckpt")
    with pytest.raises(SystemExit) as info:
        export_main([str(tmp_path / "moved.ckpt"), "--out", str(tmp_path / "out3")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert f"the run's base model {tmp_path / 'old-place'}: no such file or folder; pass --base-model" in err
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()


def test_command_says_when_the_output_folder_takes_no_files(cli_run, tmp_path, monkeypatch, capsys):
    import lightning_modules.lora_diffusion as lora_diffusion

    ckpt = cli_run / "checkpoints" / "last.ckpt"
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")

    def slow_load(*args, **kwargs):
        raise AssertionError("the base model loaded before --out was checked")

    monkeypatch.setattr(lora_diffusion.LoRADiffusion, "load_from_checkpoint", slow_load)
    with pytest.raises(SystemExit) as info:
        export_main([str(ckpt), "--out", str(a_file / "lora")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert f"{a_file / 'lora'}: cannot write the LoRA files there (Not a directory); pass --out" in err
    assert a_file.read_text() == "mine"
    monkeypatch.undo()

    # A failure while writing (the disk filled up): one message, exit 1, what was there before untouched.
    import lora_files.lora_formats as lora_formats

    out = tmp_path / "out"
    export_main([str(ckpt), "--out", str(out)])
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(lora_formats, "save_kohya_lora", full)
    with pytest.raises(SystemExit) as info:
        export_main([str(ckpt), "--out", str(out), "--name", "other"])
    err = capsys.readouterr().err
    assert info.value.code == 1 and "No space left on device" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # Into folders it had to make: they go again with the failure.
    with pytest.raises(SystemExit):
        export_main([str(ckpt), "--out", str(tmp_path / "new" / "lora")])
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("name", ["", "a/b", ".hidden"])
def test_export_name_that_is_no_file_name_is_refused(name, capsys, tmp_path):
    with pytest.raises(ValueError, match="export.name"):
        LoraExport(name=name)
    # `likeness export --name "my lora/v1"` wrote v1-step*.safetensors and a card naming <lora:my lora/v1-step...>.
    with pytest.raises(SystemExit) as info:
        export_main([str(tmp_path / "any.ckpt"), "--name", name])
    assert info.value.code == 2 and f"--name {name!r}: choose a plain file name" in capsys.readouterr().err


def test_a_logger_name_with_folders_gives_one_file_name():
    from types import SimpleNamespace

    from callbacks.export_facts import run_name

    trainer = SimpleNamespace(logger=SimpleNamespace(name="brad/rank8", version=2))
    assert run_name(trainer) == "brad-rank8-v2"


def test_default_names_differ_between_runs_and_steps(cli_run, demo_cli, tmp_path):
    """Without export.name the kohya files are <run>-v<version>-step<N>: two runs never share an A1111 alias."""
    names = set()
    for _ in range(2):
        cli = train_main(demo_cli("fit", tmp_path, "--trainer.max_steps=1", "--validation.baseline=false",
                                  "--validation.at_end=false", "--trainer.limit_val_batches=0"))  # fmt: skip
        run = Path(cli.trainer.log_dir)
        (kohya,) = [p for p in (run / "lora" / "final").glob("*.safetensors") if p.name != DIFFUSERS_WEIGHT_NAME]
        assert kohya.stem == f"demo-{run.name.replace('version_', 'v')}-step000001"
        assert _read(kohya)[0]["ss_output_name"] == kohya.stem
        names.add(kohya.stem)
    assert len(names) == 2


def test_export_command_counts_captions_as_trained(demo_photos):
    # `likeness export` re-reads the captions: with a trigger-word template, as the run trained on them (#12).
    from callbacks.checkpoint_export import _captions

    raw = sorted(p.read_text(encoding="utf-8").strip() for p in demo_photos.glob("*.txt"))
    templated = _captions({"data_dir": str(demo_photos), "caption_template": "photo of sks woman, {caption}"})
    assert sorted(templated) == [f"photo of sks woman, {caption}" for caption in raw]


@pytest.mark.parametrize(
    ("data", "crop"),
    [({"crop": "face", "center_crop": True}, "face"), ({"crop": "center", "center_crop": False}, "random")],
)
def test_model_card_settings_give_the_crop_trained_with(data, crop):
    from callbacks.export_facts import training_settings
    from datamodules.data_settings import check_crop_and_captions

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # center_crop's deprecation
        assert check_crop_and_captions(**data) == crop  # what the data module trains with
    settings = training_settings({"lora_rank": 4}, {"resolution": 64, **data})
    assert settings["crop"] == crop and "center_crop" not in settings
