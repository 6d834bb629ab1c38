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


@pytest.fixture
def python_sigint():
    """Python's own Ctrl+C handler, as in a shell: an earlier test in this process may have left Lightning's SIG_IGN
    (its KeyboardInterrupt handling sets it and never puts the old one back)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_ctrl_c_during_the_final_validation_saves_the_last_step_at_once(
    demo_cli, tmp_path, monkeypatch, caplog, python_sigint
):
    # max_steps no multiple of every_n_train_steps: last.ckpt comes only after the final validation. A Ctrl+C there
    # was ignored until the validation ended, and a second one (a user waiting minutes) left no checkpoint at all.
    import os

    from lightning_modules.lora_diffusion import LoRADiffusion

    calls = []
    generate_batch = LoRADiffusion.generate_batch

    def ctrl_c_while_generating(self, batch):
        calls.append(self.trainer.global_step)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # Python runs the handler before the next line
            raise AssertionError("the Ctrl+C did not stop the validation")
        return generate_batch(self, batch)

    monkeypatch.setattr(LoRADiffusion, "generate_batch", ctrl_c_while_generating)
    args = ["--validation.baseline=false", "--validation.every_n_steps=0", "--trainer.max_steps=3"]
    with pytest.raises(SystemExit) as info:
        main(demo_cli("fit", tmp_path, *args, "--checkpoint.every_n_train_steps=100"))
    assert info.value.code == 128 + signal.SIGINT and calls == [3]
    last = next(tmp_path.rglob("checkpoints/last.ckpt"))
    assert torch.load(last, weights_only=True)["global_step"] == 3
    said = caplog.text  # rank_zero_info: Lightning's logger
    assert "validation stopped; a checkpoint is saved next" in said and f"checkpoint: {last}" in said
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl+C is Python's own again


def test_first_ctrl_c_stops_interruptible_work_only(tmp_path):
    from types import SimpleNamespace

    from callbacks.stop_checkpoint import Interruptible, StopCheckpoint

    trainer = SimpleNamespace(_signal_connector=SimpleNamespace(received_sigterm=False))
    handler = StopCheckpoint()._sigint(trainer)
    with Interruptible() as work:
        handler(signal.SIGINT, None)
        raise AssertionError("not reached")
    assert work.interrupted and trainer._signal_connector.received_sigterm and Interruptible.active == 0
    with Interruptible() as work:
        pass
    assert not work.interrupted
