"""Checkpoints are whole or absent: a full disk or an interrupted write never tears a file written earlier."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

import datamodules.files as files
from datamodules.files import write_atomically
from train import main

QUIET = ["--validation.baseline=false", "--validation.every_n_steps=0", "--validation.at_end=false"]


class FailingFile:
    """A real file whose write stores half of the data, then raises ``error`` (a full disk, a kill)."""

    def __init__(self, file, error: BaseException) -> None:
        self.file, self.error = file, error

    def write(self, data) -> None:
        self.file.write(bytes(data)[: len(data) // 2])
        raise self.error

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


def fail_writes(monkeypatch, when: str, error: BaseException) -> None:
    def fake_open(path, mode="r", *args, **kwargs):
        file = open(path, mode, *args, **kwargs)  # noqa: SIM115 - closed by FailingFile
        return FailingFile(file, error) if when in Path(path).name else file

    monkeypatch.setattr(files, "open", fake_open, raising=False)


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    write_atomically(target, b"good old checkpoint")
    fail_writes(monkeypatch, "last.ckpt", KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, b"x" * 1000)
    assert target.read_bytes() == b"good old checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no partial file left behind
    # What a SIGKILL leaves (no cleanup ran) goes at the next write of that file.
    (tmp_path / ".last.ckpt.123-abc.partial").write_bytes(b"torn")
    monkeypatch.undo()
    write_atomically(target, b"new checkpoint")
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"] and target.read_bytes() == b"new checkpoint"


def test_full_disk_stops_with_a_message_and_keeps_earlier_checkpoints(demo_cli, tmp_path, monkeypatch, capsys):
    fail_writes(monkeypatch, "step000004", OSError(errno.ENOSPC, "No space left on device"))
    args = [*QUIET, "--trainer.max_steps=6", "--checkpoint.every_n_train_steps=2", "--export.on_checkpoint=false"]
    with pytest.raises(SystemExit) as info:
        main(demo_cli("fit", tmp_path, *args))
    assert info.value.code != 0
    err = capsys.readouterr().err
    folder = next(tmp_path.rglob("checkpoints"))
    assert "No space left on device" in err and str(folder) in err and "Traceback" not in err
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == ["last.ckpt", "step000002.ckpt"]
    for name in ("last.ckpt", "step000002.ckpt"):
        assert torch.load(folder / name, weights_only=True)["global_step"] == 2


def test_interrupted_lora_export_keeps_the_files_exported_before(tiny_sd, tmp_path, monkeypatch):
    import lora_files.lora_formats as lora_formats
    from lightning_modules.lora_diffusion import LoRADiffusion

    model = LoRADiffusion(str(tiny_sd), train_text_encoder=True)
    common = {"name": "me", "base_model": "tiny", "steps": 1, "resolution": 64}
    files = lora_formats.export_lora(tmp_path / "final", model.unet, model.text_encoder, **common)
    before = {kind: path.read_bytes() for kind, path in files.items()}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lora_formats, "write_model_card", killed)  # dies after writing both weight files
    with torch.no_grad():
        next(p for n, p in model.unet.named_parameters() if "lora_B" in n).add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        lora_formats.export_lora(tmp_path / "final", model.unet, model.text_encoder, **common)
    assert {kind: path.read_bytes() for kind, path in files.items()} == before  # untouched, not half new
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no staging left behind
    # A staging folder a SIGKILL left behind goes at the next export.
    (tmp_path / ".final.partial-killed").mkdir()
    monkeypatch.undo()
    lora_formats.export_lora(tmp_path / "final", model.unet, model.text_encoder, **common)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert files["kohya"].read_bytes() != before["kohya"]  # the new weights, whole


def test_full_disk_during_lora_export_is_one_message(demo_cli, tmp_path, monkeypatch, capsys):
    import lora_files.lora_formats as lora_formats

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(lora_formats, "save_kohya_lora", full)
    with pytest.raises(SystemExit) as info:
        main(demo_cli("fit", tmp_path, *QUIET, "--trainer.max_steps=2", "--checkpoint.every_n_train_steps=2"))
    err = capsys.readouterr().err
    assert info.value.code == 2 and "No space left on device" in err and "Traceback" not in err
    assert not [p for p in tmp_path.rglob("*") if ".partial" in p.name]  # the staging folder is gone
