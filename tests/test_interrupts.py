"""SIGTERM and Ctrl+C during training save a checkpoint at the current step and exit non-zero."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train import main

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--validation.baseline=false", "--validation.every_n_steps=0", "--validation.at_end=false"]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_last_checkpoint_and_exits_non_zero(demo_cli, tmp_path, signum):
    args = [*QUIET, "--trainer.max_steps=100000", "--checkpoint.every_n_train_steps=3", "--export.on_checkpoint=false"]
    process = subprocess.Popen(
        [sys.executable, "train.py", *demo_cli("fit", tmp_path, *args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not list(tmp_path.rglob("step000003.ckpt")):  # training is under way
            assert process.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        process.send_signal(signum)
        output, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + signum, output
    last = next(tmp_path.rglob("checkpoints/last.ckpt"))
    step = torch.load(last, weights_only=True)["global_step"]
    assert step >= 3  # the step it was at, not only the last periodic checkpoint's
    assert f"checkpoint saved: {last}" in output and "Traceback" not in output
    resumed = main(demo_cli("fit", tmp_path, *QUIET, f"--trainer.max_steps={step + 1}", "--ckpt_path=last"))
    assert resumed.model.loaded_step == step and resumed.trainer.global_step == step + 1


def test_second_ctrl_c_stops_at_once_with_the_shells_status(tmp_path):
    from types import SimpleNamespace

    from callbacks.stop_checkpoint import StopCheckpoint

    trainer = SimpleNamespace(_signal_connector=SimpleNamespace(received_sigterm=False))
    handler = StopCheckpoint()._sigint(trainer)
    handler(signal.SIGINT, None)  # the first: finish the step, save, then stop
    assert trainer._signal_connector.received_sigterm
    with pytest.raises(SystemExit) as info:
        handler(signal.SIGINT, None)  # the second: now
    assert info.value.code == 128 + signal.SIGINT  # 130, as a shell reports Ctrl+C (Lightning's path gave 1)
