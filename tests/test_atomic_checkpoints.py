"""Checkpoints are whole or absent: a full disk or an interrupted write never tears a file written earlier."""

from __future__ import annotations

import concurrent.futures
import errno
import multiprocessing
import os
import time
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

    def fileno(self) -> int:
        return self.file.fileno()

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
    # What a SIGKILL leaves (no cleanup ran, nobody holds its lock) goes at the next write of that file.
    torn = tmp_path / ".last.ckpt.123-abc.partial"
    torn.write_bytes(b"torn")
    os.utime(torn, (time.time() - 120, time.time() - 120))
    monkeypatch.undo()
    write_atomically(target, b"new checkpoint")
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"] and target.read_bytes() == b"new checkpoint"


@pytest.mark.skipif(files.fcntl is None, reason="POSIX locks")
def test_a_live_writers_partial_file_is_not_taken_for_a_leftover(tmp_path):
    target = tmp_path / "entry.safetensors"
    live, fresh = tmp_path / ".entry.safetensors.1-aaa.partial", tmp_path / ".entry.safetensors.2-bbb.partial"
    live.write_bytes(b"being written")
    os.utime(live, (time.time() - 120, time.time() - 120))
    fresh.write_bytes(b"just created, not locked yet")
    with open(live, "rb") as held:
        files.fcntl.flock(held.fileno(), files.fcntl.LOCK_EX)  # another writer, still writing
        write_atomically(target, b"mine")
        assert live.exists() and fresh.exists()
    write_atomically(target, b"mine again")  # its writer is gone now (the lock went with it)
    assert not live.exists() and fresh.exists() and target.read_bytes() == b"mine again"


def _write_entries(folder: str, seed: int, barrier) -> int:
    barrier.wait()  # both write at the same time, whatever their start-up took
    errors, deadline, i = 0, time.monotonic() + 1.5, 0
    while time.monotonic() < deadline:
        i += 1
        try:
            write_atomically(Path(folder) / f"{i % 5}.bin", bytes([seed]) * 4096)
        except OSError:
            errors += 1
    return errors


def test_two_processes_writing_one_cache_do_not_break_each_other(tmp_path):
    # Two runs sharing ~/.cache/likeness write the same entries at once (each removed the other's partial file).
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, concurrent.futures.ProcessPoolExecutor(2, mp_context=context) as pool:
        barrier = manager.Barrier(2)
        errors = list(pool.map(_write_entries, [str(tmp_path)] * 2, [1, 2], [barrier] * 2))
    assert errors == [0, 0]
    for entry in tmp_path.glob("*.bin"):
        assert entry.read_bytes() in (b"\x01" * 4096, b"\x02" * 4096)
    assert not list(tmp_path.glob(".*.partial"))


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
    old_umask = os.umask(0o022)
    try:
        files = lora_formats.export_lora(tmp_path / "final", model.unet, model.text_encoder, **common)
    finally:
        os.umask(old_umask)
    # Readable by a ComfyUI or web server of another user, as any file the umask allows (safetensors makes 0o600).
    assert {kind: path.stat().st_mode & 0o777 for kind, path in files.items()} == dict.fromkeys(files, 0o644)
    before = {kind: path.read_bytes() for kind, path in files.items()}
    before_names = [path.name for path in files.values()]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lora_formats, "write_model_card", killed)  # dies after writing both weight files
    with torch.no_grad():
        next(p for n, p in model.unet.named_parameters() if "lora_B" in n).add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        lora_formats.export_lora(tmp_path / "final", model.unet, model.text_encoder, **common)
    assert {kind: path.read_bytes() for kind, path in files.items()} == before  # untouched, not half new
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert sorted(p.name for p in files["kohya"].parent.iterdir()) == sorted(before_names)  # no staging left behind
    # A staging folder a SIGKILL left behind goes at the next export; a young one may be another export's.
    killed_one = tmp_path / "final" / f"{lora_formats.STAGING_PREFIX}killed"
    (killed_one / "part").mkdir(parents=True)
    os.utime(killed_one, (time.time() - lora_formats.STAGING_MAX_AGE_S - 5,) * 2)
    live = tmp_path / "final" / f"{lora_formats.STAGING_PREFIX}live"
    live.mkdir()
    monkeypatch.undo()
    lora_formats.export_lora(tmp_path / "final", model.unet, model.text_encoder, **common)
    assert sorted(p.name for p in files["kohya"].parent.iterdir()) == sorted([*before_names, live.name])
    assert files["kohya"].read_bytes() != before["kohya"]  # the new weights, whole


def test_lora_export_renames_only_within_its_folder(tiny_sd, tmp_path, monkeypatch):
    # The output folder may be a mount point (a Colab Drive folder, a docker volume) or sit in a folder the user
    # cannot write to: staging beside it failed there (os.replace across filesystems: EXDEV).
    import lora_files.lora_formats as lora_formats
    from lightning_modules.lora_diffusion import LoRADiffusion

    model = LoRADiffusion(str(tiny_sd))
    real_replace = os.replace

    def replace_on_one_filesystem(src, dst):
        if not Path(src).resolve().is_relative_to(Path(dst).resolve().parent):
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(src))
        real_replace(src, dst)

    monkeypatch.setattr(lora_formats.os, "replace", replace_on_one_filesystem)
    folder = tmp_path / "mount"
    files = lora_formats.export_lora(folder, model.unet, name="me", base_model="tiny", steps=1, resolution=64)
    assert {path.parent for path in files.values()} == {folder}
    assert sorted(p.name for p in folder.iterdir()) == sorted(path.name for path in files.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mount"]  # nothing written beside it


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
