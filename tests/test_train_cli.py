"""train.py end to end through main(): config parsing, a short fit, small checkpoints, exact resume."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from train import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_config_parses(config, capsys):
    path = ROOT / "configs" / config
    settings = yaml.safe_load(path.read_text(encoding="utf-8"))
    # An overlay (no base model of its own, e.g. t4.yaml) is documented for use after brad.yaml.
    overlay = "pretrained_model_name_or_path" not in (settings.get("model") or {})
    configs = ["--config", str(ROOT / "configs" / "brad.yaml")] if overlay else []
    with pytest.raises(SystemExit) as info:
        main(["fit", *configs, "--config", str(path), "--print_config"])
    assert info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["pretrained_model_name_or_path"] and printed["data"]["data_dir"]
    for section, values in settings.items():  # every setting of the file arrives where it was meant
        if isinstance(values, dict) and section in printed:
            for key, value in values.items():
                if not isinstance(value, dict):
                    assert printed[section][key] == value, (config, section, key)


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def lora_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, weights_only=True, map_location="cpu")["state_dict"]


def test_demo_fit_logs_and_writes_a_small_checkpoint(demo_cli, tmp_path):
    cli = main(
        demo_cli(
            "fit",
            tmp_path,
            "--trainer.max_steps=6",
            "--trainer.log_every_n_steps=1",
            "--trainer.limit_val_batches=0",
        )
    )
    run_dir = Path(cli.trainer.log_dir)
    assert (run_dir / "config.yaml").is_file()  # the resolved config beside the logs
    scalars = read_scalars(run_dir)
    assert [step for step, _ in scalars["train/loss"]] == list(range(6))
    assert {"train/lr/unet", "train/lr/te"} <= set(scalars)
    # TensorBoard opens on what matters: training and identity curves, no epoch or hp_metric placeholder (#10).
    assert {tag.split("/")[0] for tag in scalars} <= {"train", "val", "reference"}, sorted(scalars)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.stat().st_size < 1_000_000
    saved = lora_tensors(ckpt)
    assert set(saved) == cli.model.trainable_names()  # no frozen tensor


def test_a_fit_warns_of_nothing_it_does_on_purpose(demo_cli, tmp_path):
    """Lightning's warnings about an empty validation loader (IdentityValidation generates on its own schedule) and
    about epochs shorter than the logging interval (logging counts steps across epochs), and its use of a deprecated
    torch API, are not shown to a user; a run shorter than that interval is told it logs no training curve."""
    quiet = ["--validation.baseline=false", "--validation.every_n_steps=0", "--validation.at_end=false"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cli = main(demo_cli("fit", tmp_path, "--trainer.max_steps=5", *quiet))
    messages = [str(w.message) for w in seen]
    on_purpose = ("across ranks is zero", "logging interval", "LeafSpec")  # the last: Lightning's use of torch's API
    assert not [m for m in messages if any(text in m for text in on_purpose)], messages
    # What the second one warns of does not happen: the demo's 4-batch epochs still log every 5 steps.
    assert cli.trainer.num_training_batches < cli.trainer.log_every_n_steps == 5
    assert [step for step, _ in read_scalars(Path(cli.trainer.log_dir))["train/loss"]] == [4]
    # What it was right about: a run shorter than the interval logs no training curve. That is said, with the fix.
    with pytest.warns(UserWarning, match=r"max_steps 4 is below trainer.log_every_n_steps 5: .* no training curve"):
        cli = main(demo_cli("fit", tmp_path / "short", "--trainer.max_steps=4", *quiet))
    assert "train/loss" not in read_scalars(Path(cli.trainer.log_dir))


class StopAt(Callback):
    """Interrupts a run after ``step`` optimizer steps, as a crash or a killed job would (max_steps unchanged)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def test_resume_gives_identical_lora_weights(demo_cli, tmp_path):
    # 7 photos, batch 2: 4 batches an epoch, so step 3 is mid-epoch (the hard case) and the resumed run crosses an
    # epoch boundary (a new shuffle and flips). A 2-step warmup and then cosine restarts: the learning rate changes
    # every step, so a resume at the wrong LR would show.
    common = [
        "--trainer.max_steps=6",
        "--trainer.limit_val_batches=0",
        "--checkpoint.every_n_train_steps=3",
        "--data.random_flip=true",
        "--model.lr_warmup_steps=2",
        "--model.lora_dropout=0.1",
    ]
    whole = main(demo_cli("fit", tmp_path / "whole", *common))
    stop = '--trainer.callbacks+={"class_path": "test_train_cli.StopAt", "init_args": {"step": 3}}'
    half = main(demo_cli("fit", tmp_path / "half", *common, stop))
    half_ckpt = Path(half.trainer.log_dir) / "checkpoints" / "step000003.ckpt"
    assert torch.load(half_ckpt, weights_only=True)["global_step"] == 3
    resumed = main(demo_cli("fit", tmp_path / "half", *common, f"--ckpt_path={half_ckpt}"))
    assert resumed.trainer.global_step == 6
    lrs = [g["lr"] for g in resumed.trainer.optimizers[0].param_groups]
    assert lrs == [g["lr"] for g in whole.trainer.optimizers[0].param_groups]
    a = lora_tensors(Path(whole.trainer.log_dir) / "checkpoints" / "last.ckpt")
    b = lora_tensors(Path(resumed.trainer.log_dir) / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # ... and training did move them (the comparison is not between two untouched inits).
    c = lora_tensors(half_ckpt)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("stop", [3, 4])
def test_resume_from_the_last_checkpoint_of_a_finished_run_continues_the_data(demo_cli, tmp_path, stop):
    # A run that simply ended (max_steps, no periodic save at that step) and is extended from its last.ckpt must
    # train on what an uninterrupted run would: the rest of the epoch, then the next. That last.ckpt is saved at
    # the end of training, when Lightning has already counted the epoch as finished; the resumed run skipped the
    # rest of the epoch (stop 3, mid-epoch: 7 photos, batch 2) or a whole epoch (stop 4, at its end).
    common = [
        "--trainer.limit_val_batches=0",
        "--checkpoint.every_n_train_steps=100",
        "--data.random_flip=true",
        "--model.lr_scheduler=constant_with_warmup",  # a plan that does not depend on max_steps
        "--model.lr_warmup_steps=2",
        "--validation.baseline=false",
        "--validation.every_n_steps=0",
    ]
    whole = main(demo_cli("fit", tmp_path / "whole", *common, "--trainer.max_steps=6", "--validation.at_end=false"))
    # The first part ends with a validation, as a finished run does: its metrics stay in last.ckpt.
    first = main(demo_cli("fit", tmp_path / "part", *common, f"--trainer.max_steps={stop}"))
    last = Path(first.trainer.log_dir) / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == stop
    assert any(state.get("last_metrics") for state in saved["callbacks"].values() if isinstance(state, dict))
    resumed = main(demo_cli("fit", tmp_path / "part", *common, "--trainer.max_steps=6", f"--ckpt_path={last}"))
    assert resumed.trainer.global_step == 6
    assert resumed.trainer.current_epoch == whole.trainer.current_epoch
    a = lora_tensors(Path(whole.trainer.log_dir) / "checkpoints" / "last.ckpt")
    b = lora_tensors(Path(resumed.trainer.log_dir) / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_chain_of_resumes_from_epoch_end_checkpoints_trains_each_epoch_once(demo_cli, tmp_path):
    # 7 photos, batch 2: 4 steps an epoch, so every checkpoint of every_n_train_steps=4 is at an epoch's last batch
    # (brad.yaml's case: 50 batches an epoch, a save every 500 steps). The second resume in a row replayed an epoch.
    common = [
        "--trainer.limit_val_batches=0",
        "--checkpoint.every_n_train_steps=4",
        "--data.random_flip=true",
        "--model.lr_scheduler=constant_with_warmup",
        "--model.lr_warmup_steps=2",
        "--validation.baseline=false",
        "--validation.every_n_steps=0",
        "--validation.at_end=false",
        "--export.on_checkpoint=false",
    ]
    whole = main(demo_cli("fit", tmp_path / "whole", *common, "--trainer.max_steps=12"))
    ckpt = None
    for steps in (4, 8, 12):
        resume = [f"--ckpt_path={ckpt}"] if ckpt else []
        run = main(demo_cli("fit", tmp_path / f"to{steps}", *common, f"--trainer.max_steps={steps}", *resume))
        ckpt = Path(run.trainer.log_dir) / "checkpoints" / f"step{steps:06d}.ckpt"
    assert run.trainer.global_step == 12 and run.trainer.current_epoch == whole.trainer.current_epoch
    a = lora_tensors(Path(whole.trainer.log_dir) / "checkpoints" / "last.ckpt")
    b = lora_tensors(ckpt)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_config_wins_but_lora_settings_must_match(demo_cli, tmp_path, capsys):
    first = main(demo_cli("fit", tmp_path, "--trainer.max_steps=1", "--trainer.limit_val_batches=0"))
    ckpt = Path(first.trainer.log_dir) / "checkpoints" / "last.ckpt"
    assert first.model.hparams.snr_gamma == 5.0  # configs/demo.yaml
    # A training setting changed on resume applies (LightningCLI alone would put the checkpoint's 5.0 back).
    with pytest.warns(UserWarning, match=r"model.snr_gamma: checkpoint 5.0, config 1.0"):
        resumed = main(
            demo_cli(
                "fit",
                tmp_path,
                "--trainer.max_steps=2",
                "--trainer.limit_val_batches=0",
                "--model.snr_gamma=1.0",
                "--model.optimizer.init_args.lr=0.002",
                f"--ckpt_path={ckpt}",
            )
        )
    assert resumed.model.hparams.snr_gamma == 1.0 and resumed.trainer.global_step == 2
    # The new learning rate too, although the optimizer and scheduler state came from the checkpoint.
    assert [g["initial_lr"] for g in resumed.trainer.optimizers[0].param_groups] == [0.002, 0.002]
    assert resumed.trainer.lr_scheduler_configs[0].scheduler.base_lrs == [0.002, 0.002]
    # A setting that shapes the LoRA tensors is refused, with one clear message.
    with pytest.raises(SystemExit) as info:
        main(demo_cli("fit", tmp_path, "--model.lora_rank=8", f"--ckpt_path={ckpt}"))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "model.lora_rank: checkpoint 4, config 8" in err
    assert "Traceback" not in err


def test_bad_data_folder_is_one_clear_error(demo_cli, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "lonely.txt").write_text("a caption without a photo")
    with pytest.raises(SystemExit) as info:
        main(demo_cli("fit", tmp_path, photos=photos))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "lonely.txt" in err and "Traceback" not in err
    # A failed start leaves no empty run folder (issue #10); a run folder that existed is kept.
    assert not list((tmp_path / "demo").glob("version_*"))
    (tmp_path / "demo" / "version_0").mkdir(parents=True)
    with pytest.raises(SystemExit):
        main(demo_cli("fit", tmp_path, photos=photos))
    assert [p.name for p in (tmp_path / "demo").iterdir()] == ["version_0"]  # version_1 came and went


def test_missing_face_model_fails_at_start_up(demo_cli, tmp_path, capsys, monkeypatch):
    # The HW's GhostFaceNet + ssd need a download; offline, that is one clear error before any training step.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DEEPFACE_HOME", str(tmp_path / "empty-home"))
    with pytest.raises(SystemExit) as info:
        main(demo_cli("fit", tmp_path, "--validation.face_model=GhostFaceNet", "--validation.face_detector=ssd"))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "GhostFaceNet" in err and "Traceback" not in err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_file_that_is_no_checkpoint_is_one_clear_error(demo_cli, tmp_path, capsys):
    fake = tmp_path / "junk.ckpt"  # (an exported LoRA file has its own message: tests/test_ckpt_path.py)
    fake.write_bytes(b"\x00" * 64)
    with pytest.raises(SystemExit) as info:
        main(demo_cli("fit", tmp_path, f"--ckpt_path={fake}"))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "is not a likeness checkpoint" in err and "Traceback" not in err


def test_one_point_per_step_with_gradient_accumulation(demo_cli, tmp_path, monkeypatch):
    """Lightning's monitor logged before every micro-batch: two points per step, at the same x; and a step's
    train/* value was its last micro-batch's, not the mean of the two that trained."""
    from lightning_modules.lora_diffusion import LoRADiffusion

    micro_batches: list[dict[str, float]] = []  # the loss parts of each micro-batch, in order
    loss_terms = LoRADiffusion.loss_terms

    def recording_loss_terms(self, batch):
        terms = loss_terms(self, batch)
        parts = {"loss": terms.loss, "identity_loss": terms.identity_loss, "prior_loss": terms.prior_loss}
        micro_batches.append({name: value.item() for name, value in parts.items()})
        return terms

    monkeypatch.setattr(LoRADiffusion, "loss_terms", recording_loss_terms)
    args = ["--validation.baseline=false", "--validation.every_n_steps=0", "--validation.at_end=false"]
    args += ["--trainer.max_steps=3", "--trainer.log_every_n_steps=1", "--trainer.accumulate_grad_batches=2"]
    args += ["--model.prior_loss_weight=0.5", "--data.prior_prompts=[a photo of a woman]"]
    cli = main(demo_cli("fit", tmp_path, *args, "--export.on_checkpoint=false"))
    scalars = read_scalars(Path(cli.trainer.log_dir))
    for tag in ("train/lr/unet", "train/lr/te"):
        assert [step for step, _ in scalars[tag]] == [0, 1, 2], scalars[tag]
    assert len(micro_batches) == 6
    for name in ("loss", "identity_loss", "prior_loss"):
        logged = scalars[f"train/{name}"]
        assert [step for step, _ in logged] == [0, 1, 2], logged
        means = [(a[name] + b[name]) / 2 for a, b in zip(micro_batches[::2], micro_batches[1::2], strict=True)]
        assert [value for _, value in logged] == pytest.approx(means, rel=1e-5), name
