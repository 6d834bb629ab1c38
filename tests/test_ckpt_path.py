"""--ckpt_path: `last`, folders, URLs and LoRA files mean what a user expects, or stop with a clear message."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

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


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("https://example.com/x.ckpt", "not loaded from URLs"),
        ("last", "no run in .* has a checkpoints/last.ckpt"),
        ("{tmp}/lora.safetensors", "is a LoRA file"),
        ("{tmp}/empty-folder", "folder without last.ckpt"),
        ("{tmp}/missing.ckpt", "no such file"),
    ],
)
def test_bad_ckpt_paths_stop_before_loading_anything(demo_cli, tmp_path, capsys, given, message):
    (tmp_path / "lora.safetensors").write_bytes(b"{}")
    (tmp_path / "empty-folder").mkdir()
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
