"""--ckpt_path: `last`, folders, URLs and LoRA files mean what a user expects, or stop with a clear message."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
import torch

from callbacks.run_folders import resolve_checkpoint
from train import main

QUIET = ["--validation.baseline=false", "--validation.every_n_steps=0", "--validation.at_end=false"]


def make_run(root: Path, version: int) -> Path:
    last = root / f"version_{version}" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"ckpt")
    return last


def test_last_and_folders_resolve(tmp_path):
    runs = tmp_path / "logs" / "demo"
    old, new = make_run(runs, 0), make_run(runs, 1)
    os.utime(old, (time.time() + 60, time.time() + 60))  # written last, though in the lower version
    assert resolve_checkpoint("last", runs) == old
    assert resolve_checkpoint(str(runs / "version_1"), runs) == new  # a run folder
    assert resolve_checkpoint(str(new.parent), runs) == new  # its checkpoints folder
    assert resolve_checkpoint(str(new), runs) == new


def test_a_lora_file_given_to_validate_points_at_likeness_score(tmp_path):
    # validate/test/predict resume nothing: "the optimizer ... a resume needs" was beside the point there.
    lora = tmp_path / "pytorch_lora_weights.safetensors"
    lora.write_bytes(b"{}")
    with pytest.raises(ValueError, match="a resume needs"):
        resolve_checkpoint(str(lora), tmp_path, "fit")
    for subcommand in ("validate", "test", "predict"):
        with pytest.raises(ValueError, match=f"{subcommand} takes a .ckpt .* likeness score --lora {lora}") as info:
            resolve_checkpoint(str(lora), tmp_path, subcommand)
        assert "resume" not in str(info.value)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("https://example.com/x.ckpt", "not loaded from URLs"),
        ("last", "no run in .* has a checkpoints/last.ckpt"),
        ("{tmp}/lora.safetensors", "is a LoRA file"),
        ("{tmp}/empty-folder", "folder without last.ckpt"),
        ("{tmp}/missing.ckpt", "no such file"),
        # An SD model file: a state_dict and a global_step far beyond max_steps, but no likeness settings.
        ("{tmp}/sd-v1-5.ckpt", "not a checkpoint of a likeness run .* --model.pretrained_model_name_or_path"),
    ],
)
def test_bad_ckpt_paths_stop_before_loading_anything(demo_cli, tmp_path, capsys, given, message):
    (tmp_path / "lora.safetensors").write_bytes(b"{}")
    (tmp_path / "empty-folder").mkdir()
    torch.save({"state_dict": {"model.w": torch.zeros(2)}, "global_step": 840000}, tmp_path / "sd-v1-5.ckpt")
    with pytest.raises(SystemExit) as info:
        main(demo_cli("fit", tmp_path / "logs", *QUIET, f"--ckpt_path={given.format(tmp=tmp_path)}"))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err


def test_cli_resumes_the_newest_run_with_last(demo_cli, tmp_path):
    args = [*QUIET, "--trainer.max_steps=2", "--export.on_checkpoint=false"]
    first = main(demo_cli("fit", tmp_path, *args))
    resumed = main(demo_cli("fit", tmp_path, *QUIET, "--trainer.max_steps=3", "--ckpt_path=last"))
    assert resumed.config["fit"]["ckpt_path"] == str(Path(first.trainer.log_dir) / "checkpoints" / "last.ckpt")
    assert resumed.model.loaded_step == 2 and resumed.trainer.global_step == 3  # went on from step 2


def test_last_checkpoint_is_at_the_last_step(demo_cli, tmp_path):
    import torch

    cli = main(demo_cli("fit", tmp_path, *QUIET, "--trainer.max_steps=5", "--checkpoint.every_n_train_steps=2"))
    folder = Path(cli.trainer.log_dir) / "checkpoints"
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 5  # not 4, the last periodic save
    assert torch.load(folder / "step000004.ckpt", weights_only=True)["global_step"] == 4


def test_finished_run_cannot_be_resumed_and_extending_says_what_the_schedule_does(demo_cli, tmp_path, capsys):
    from diffusers.optimization import get_scheduler
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = [*QUIET, "--export.on_checkpoint=false", "--trainer.log_every_n_steps=1", "--model.lr_warmup_steps=0"]
    common += ["--model.lr_scheduler=cosine"]
    first = main(demo_cli("fit", tmp_path, *common, "--trainer.max_steps=4"))
    last = Path(first.trainer.log_dir) / "checkpoints" / "last.ckpt"
    with pytest.raises(SystemExit) as info:
        main(demo_cli("fit", tmp_path, *common, "--trainer.max_steps=4", f"--ckpt_path={last}"))
    assert info.value.code == 2 and "nothing is left to train" in capsys.readouterr().err
    # The same when epochs end the run (4 photos, batch 1: 4 steps an epoch): no new run folder, no LoRA export.
    by_epochs = ["--trainer.max_steps=-1", "--trainer.max_epochs=1"]
    done = main(demo_cli("fit", tmp_path / "epochs", *common, *by_epochs))
    assert done.trainer.global_step == 4
    with pytest.raises(SystemExit) as info:
        main(demo_cli("fit", tmp_path / "epochs", *common, *by_epochs, "--ckpt_path=last"))
    err = capsys.readouterr().err
    assert info.value.code == 2 and "has trained 1 epoch (step 4) and trainer.max_epochs is 1: nothing is" in err
    assert [p.name for p in (tmp_path / "epochs" / "demo").iterdir()] == ["version_0"]
    # Epochs are counted from the loop state, not the checkpoint's `epoch` field. A periodic save at an epoch's
    # last batch has that epoch's index (0 here), yet nothing is left: it was resumed and wrote a new run folder.
    periodic = main(demo_cli("fit", tmp_path / "periodic", *common, *by_epochs, "--checkpoint.every_n_train_steps=4"))
    step4 = next((Path(periodic.trainer.log_dir) / "checkpoints").glob("step*4.ckpt"))
    assert torch.load(step4, weights_only=True)["epoch"] == 0
    with pytest.raises(SystemExit) as info:
        main(demo_cli("fit", tmp_path / "periodic", *common, *by_epochs, f"--ckpt_path={step4}"))
    assert info.value.code == 2 and "has trained 1 epoch (step 4)" in capsys.readouterr().err
    # A run stopped by max_steps mid-epoch (step 6 of 8) has an epoch left, though its last.ckpt says epoch 2.
    two_epochs = ["--trainer.max_epochs=2"]
    mid = main(demo_cli("fit", tmp_path / "mid", *common, *two_epochs, "--trainer.max_steps=6"))
    assert torch.load(Path(mid.trainer.log_dir) / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 2
    on = main(demo_cli("fit", tmp_path / "mid", *common, *two_epochs, "--trainer.max_steps=7", "--ckpt_path=last"))
    assert on.trainer.global_step == 7

    with pytest.warns(UserWarning, match="planned 4") as record:
        longer = main(demo_cli("fit", tmp_path, *common, "--trainer.max_steps=8", f"--ckpt_path={last}"))
    message = next(str(w.message) for w in record if "planned 4" in str(w.message))
    # Independently: the demo's lr (1e-3) under diffusers' cosine schedule for 8 and for 4 steps, at step 4.
    factor = {}
    for total in (4, 8):
        probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        factor[total] = get_scheduler("cosine", probe, num_warmup_steps=0, num_training_steps=total).lr_lambdas[0](4)
    assert f"is {1e-3 * factor[8]:.3g} (the old plan had {1e-3 * factor[4]:.3g})" in message
    acc = EventAccumulator(longer.trainer.log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("train/lr/unet")}
    # ... and it does what it says: the first resumed step trains at that rate (the monitor logs it one step on).
    assert logged[min(logged)] == pytest.approx(1e-3 * factor[8], rel=1e-6)


def test_a_run_given_relative_paths_works_from_any_directory(demo_cli, tiny_sd, demo_photos, tmp_path, monkeypatch):
    # configs/demo.yaml and brad.yaml name their model and photos relative to the repository; `likeness export
    # CKPT`, `score --ckpt` and --ckpt_path must still find them when run from elsewhere.
    import warnings

    import yaml

    from callbacks.checkpoint_export import main as export_main

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    monkeypatch.chdir(work)
    relative = {
        "model.pretrained_model_name_or_path": os.path.relpath(tiny_sd, work),
        "data.data_dir": os.path.relpath(demo_photos, work),
        "data.validation_prompts": os.path.relpath(demo_photos.parent / "validation_prompts.txt", work),
    }
    args = [*QUIET, "--trainer.max_steps=2", "--export.on_checkpoint=false"]
    args += [f"--{key}={value}" for key, value in relative.items()]
    cli = main(demo_cli("fit", tmp_path / "logs", *args, "--trainer.logger.init_args.save_dir=logs"))
    ckpt = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    config = yaml.safe_load((Path(cli.trainer.log_dir) / "config.yaml").read_text())
    for key, value in relative.items():
        section, name = key.split(".")
        want = str(work / value)
        assert os.path.realpath(config[section][name]) == os.path.realpath(want), key
        hparams = saved["hyper_parameters" if section == "model" else "datamodule_hyper_parameters"]
        assert Path(hparams[name]).is_absolute() and os.path.samefile(hparams[name], want), key
    # A Hub id stays a Hub id (no such folder here).
    from callbacks.run_folders import absolute_setting

    assert absolute_setting("pretrained_model_name_or_path", "org/model") == "org/model"
    assert absolute_setting("data_dir", "photos") == str(work / "photos")

    monkeypatch.chdir(elsewhere)
    export_main([str(ckpt), "--out", str(tmp_path / "out")])
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"base_model: {cli.model.hparams.pretrained_model_name_or_path}\n" in card
    assert "## Caption words" in card  # the training captions were found again
    # The run's config.yaml resumes into the same logs/<name> from elsewhere, and `last` finds its checkpoint.
    assert config["trainer"]["logger"]["init_args"]["save_dir"] == str(work / "logs")
    resumed = main(["fit", "--config", str(Path(cli.trainer.log_dir) / "config.yaml"), "--trainer.max_steps=3",
                    "--ckpt_path=last"])  # fmt: skip
    assert Path(resumed.trainer.log_dir).parent == Path(cli.trainer.log_dir).parent and resumed.trainer.global_step == 3

    # A checkpoint of an older version, which kept the paths as given: resuming it with the same relative config
    # from the same directory reports no changed setting.
    monkeypatch.chdir(work)
    saved["hyper_parameters"]["pretrained_model_name_or_path"] = relative["model.pretrained_model_name_or_path"]
    saved["datamodule_hyper_parameters"]["data_dir"] = relative["data.data_dir"]
    old = tmp_path / "old.ckpt"
    torch.save(saved, old)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(demo_cli("fit", tmp_path / "logs", *args, "--trainer.max_steps=3", f"--ckpt_path={old}"))
    assert not [w for w in caught if "Settings differ" in str(w.message)]


def test_every_path_setting_is_saved_absolute(tmp_path, monkeypatch):
    """Each setting that names a file or folder, as a resume from another directory reads it from config.yaml."""
    from jsonargparse import Namespace

    from callbacks.run_folders import absolute_path_settings

    monkeypatch.chdir(tmp_path)
    config = Namespace(
        checkpoint=Namespace(dirpath="ckpts"),
        predict_writer=Namespace(output_dir="pictures"),
        data=Namespace(data_dir="photos", cache_dir=None),
        trainer=Namespace(default_root_dir="runs", logger=Namespace(init_args=Namespace(save_dir="logs"))),
    )
    absolute_path_settings(config)
    assert config.checkpoint.dirpath == str(tmp_path / "ckpts")
    assert config.predict_writer.output_dir == str(tmp_path / "pictures") and config.data.cache_dir is None
    assert config.data.data_dir == str(tmp_path / "photos") and config.trainer.default_root_dir == str(
        tmp_path / "runs"
    )
    assert config.trainer.logger.init_args.save_dir == str(tmp_path / "logs")
