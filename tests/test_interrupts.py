"""SIGTERM and Ctrl+C during training save a checkpoint at the current step and exit non-zero."""

from __future__ import annotations

import logging
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


@pytest.mark.parametrize(
    ("signum", "save_last"), [(signal.SIGINT, True), (signal.SIGTERM, True), (signal.SIGINT, False)]
)
def test_a_signal_during_the_final_validation_saves_the_last_step_at_once(
    demo_cli, tmp_path, monkeypatch, caplog, python_sigint, signum, save_last
):
    # max_steps no multiple of every_n_train_steps: last.ckpt comes only after the final validation. A Ctrl+C there
    # was ignored until the validation ended, and a second one (a user waiting minutes) left no checkpoint at all;
    # a SIGTERM (docker stop, Slurm: SIGKILL seconds later) was not even reported: the run exited 0.
    import os

    from lightning_modules.lora_diffusion import LoRADiffusion

    calls = []
    generate_batch = LoRADiffusion.generate_batch

    def signal_while_generating(self, batch):
        calls.append(self.trainer.global_step)
        if len(calls) == 1:
            os.kill(os.getpid(), signum)  # Python runs the handler before the next line
            raise AssertionError("the signal did not stop the validation")
        return generate_batch(self, batch)

    monkeypatch.setattr(LoRADiffusion, "generate_batch", signal_while_generating)
    args = ["--validation.baseline=false", "--validation.every_n_steps=0", "--trainer.max_steps=3"]
    args += ["--checkpoint.every_n_train_steps=100", f"--checkpoint.save_last={str(save_last).lower()}"]
    with pytest.raises(SystemExit) as info:
        main(demo_cli("fit", tmp_path, *args))
    assert info.value.code == 128 + signum and calls == [3]
    said = caplog.text  # rank_zero_info: Lightning's logger
    name = signal.Signals(signum).name
    assert f"{'Ctrl+C' if signum == signal.SIGINT else name}: validation stopped" in said
    # Saved also with checkpoint.save_last off, as a signal during training saves: "a checkpoint is saved next".
    last = next(tmp_path.rglob("checkpoints/last.ckpt"))
    assert torch.load(last, weights_only=True)["global_step"] == 3
    assert f"Stopped by {name} after the last step; checkpoint: {last}" in said
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl+C is Python's own again


ACCUMULATE = [
    *QUIET,
    "--trainer.accumulate_grad_batches=2",
    "--trainer.max_steps=4",
    "--checkpoint.every_n_train_steps=100",
    "--export.on_checkpoint=false",
    "--data.random_flip=true",
    "--model.lora_dropout=0.1",  # draws from the RNG in every micro-batch, as the noise and timesteps do
]


def signal_at_micro_batch(monkeypatch, number: int) -> None:
    """SIGTERM during the ``number``-th micro-batch of the next fit (Lightning stops at that batch's end)."""
    import os

    from lightning_modules.lora_diffusion import LoRADiffusion

    calls, training_step = [], LoRADiffusion.training_step

    def step(self, batch, batch_idx):
        calls.append(batch_idx)
        if len(calls) == number:
            os.kill(os.getpid(), signal.SIGTERM)
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(LoRADiffusion, "training_step", step)


@pytest.mark.parametrize("micro_batch", [3, 5])
def test_a_signal_between_micro_batches_resumes_the_unfinished_step_whole(
    demo_cli, tmp_path, monkeypatch, caplog, micro_batch
):
    """Lightning stops after any micro-batch; the checkpoint counted those of the unfinished step as trained (the
    loop counters, the data position, the RNG), and the resume skipped them. 7 photos, batch 2, 2 micro-batches a
    step: micro-batch 3 is the first of step 2, micro-batch 5 the first of epoch 2 (step 3)."""
    whole = main(demo_cli("fit", tmp_path / "whole", *ACCUMULATE))
    signal_at_micro_batch(monkeypatch, micro_batch)
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as info:
        main(demo_cli("fit", tmp_path / "part", *ACCUMULATE))
    assert info.value.code == 128 + signal.SIGTERM
    last = next((tmp_path / "part").rglob("checkpoints/last.ckpt"))
    step = (micro_batch - 1) // 2
    assert torch.load(last, weights_only=True)["global_step"] == step
    assert f"after step {step} (1 micro-batch(es) of step {step + 1} are trained again on resume)" in caplog.text
    monkeypatch.undo()
    resumed = main(demo_cli("fit", tmp_path / "part", *ACCUMULATE, f"--ckpt_path={last}"))
    assert resumed.trainer.global_step == 4 and resumed.trainer.current_epoch == whole.trainer.current_epoch
    a = torch.load(Path(whole.trainer.log_dir) / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(Path(resumed.trainer.log_dir) / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_signal_inside_the_first_step_saves_nothing_and_says_so(demo_cli, tmp_path, monkeypatch, caplog):
    signal_at_micro_batch(monkeypatch, 1)
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as info:
        main(demo_cli("fit", tmp_path, *ACCUMULATE))
    assert info.value.code == 128 + signal.SIGTERM
    assert not list(tmp_path.rglob("*.ckpt"))
    assert "before this run finished an optimizer step: nothing to save (start it again)" in caplog.text
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_stop_at_the_end_of_training_inside_the_first_step_saves_nothing(python_sigint, caplog):
    """The path where training ends (a signal in the final validation) inside the run's first step: nothing was
    trained, so no ``last.ckpt`` is written (it would claim step 0 of a run that read batches) and the message says
    so, not "after the last step"."""
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import ModelCheckpoint

    from callbacks.stop_checkpoint import StopCheckpoint

    epoch_loop = SimpleNamespace(_should_accumulate=lambda: True)
    trainer = SimpleNamespace(
        _signal_connector=SimpleNamespace(received_sigterm=False),
        checkpoint_callback=ModelCheckpoint(save_last=True),
        global_step=0,
        training=True,
        fit_loop=SimpleNamespace(epoch_loop=epoch_loop),
        ckpt_path="run/last.ckpt",
    )
    stop = StopCheckpoint()
    stop.on_train_start(trainer, None)
    stop._signal = signal.SIGTERM
    stop._save_last = lambda trainer: pytest.fail("saved a checkpoint of no step")
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as info:
        stop.on_train_end(trainer, None)
    assert info.value.code == 128 + signal.SIGTERM
    assert "nothing to save (resume with --ckpt_path run/last.ckpt again)" in caplog.text
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("when", ["in the baseline", "in the step before a validation"])
def test_a_signal_never_waits_for_a_validation(demo_cli, tmp_path, monkeypatch, caplog, python_sigint, when):
    """The baseline ran before the handlers were installed (a SIGTERM waited for all of it, a Ctrl+C was Lightning's
    exit 1); a signal in the step before a validation let the whole validation run before the checkpoint."""
    import os

    from lightning_modules.lora_diffusion import LoRADiffusion

    calls, steps = [], []
    generate_batch, training_step = LoRADiffusion.generate_batch, LoRADiffusion.training_step

    def signal_in_the_baseline(self, batch):
        calls.append(self.trainer.global_step)
        if when == "in the baseline" and len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("the signal did not stop the validation")
        return generate_batch(self, batch)

    def signal_in_step_two(self, batch, batch_idx):
        steps.append(self.trainer.global_step)
        if when != "in the baseline" and self.trainer.global_step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(LoRADiffusion, "generate_batch", signal_in_the_baseline)
    monkeypatch.setattr(LoRADiffusion, "training_step", signal_in_step_two)
    args = [f"--validation.baseline={str(when == 'in the baseline').lower()}", "--validation.every_n_steps=2"]
    args += ["--trainer.max_steps=6", "--checkpoint.every_n_train_steps=100", "--data.validation_batch_size=1"]
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as info:
        main(demo_cli("fit", tmp_path, *args))
    assert info.value.code == 128 + signal.SIGTERM
    last = next(tmp_path.rglob("checkpoints/last.ckpt"))
    step = torch.load(last, weights_only=True)["global_step"]
    if when == "in the baseline":
        assert calls == [0] and "SIGTERM: validation stopped" in caplog.text and step <= 1
    else:
        assert calls == [] and step == 2 and "Validation at step 2 skipped: stopping" in caplog.text
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_signal_while_generation_restores_the_rng_lets_the_restore_finish(monkeypatch, python_sigint):
    """The exception a handler raises lands between any two bytecodes: in the RNG restore it left torch's RNG as
    the validation left it, and the checkpoint saved next held that state (a resume no longer exact)."""
    import os
    from types import SimpleNamespace

    import numpy as np

    from callbacks.identity_validation import generate_restoring_state
    from callbacks.interruptible import Interruptible
    from callbacks.stop_checkpoint import StopCheckpoint

    class Drawing(torch.nn.Linear):
        def generate_batch(self, batch):
            return {"noise": torch.rand(4)}  # generating draws from the RNG

    module = Drawing(2, 2)
    trainer = SimpleNamespace(_signal_connector=SimpleNamespace(received_sigterm=False))
    set_state = np.random.set_state

    def set_state_then_ctrl_c(state):
        set_state(state)
        os.kill(os.getpid(), signal.SIGINT)  # between NumPy's RNG restore and torch's

    monkeypatch.setattr(np.random, "set_state", set_state_then_ctrl_c)
    previous = signal.signal(signal.SIGINT, StopCheckpoint()._sigint(trainer))
    try:
        torch.manual_seed(0)
        before = torch.get_rng_state()
        with Interruptible() as work:
            outputs = generate_restoring_state(module, [0, 1])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert not work.interrupted and len(outputs) == 2 and module.training
    assert torch.equal(torch.get_rng_state(), before)
    assert trainer._signal_connector.received_sigterm  # the run still stops, after this step


def test_a_second_ctrl_c_while_last_ckpt_is_written_stops_with_130(python_sigint):
    """The handlers were put back before the save: a second Ctrl+C there was Python's KeyboardInterrupt (a
    traceback, exit 1)."""
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import ModelCheckpoint

    from callbacks.stop_checkpoint import StopCheckpoint

    periodic = ModelCheckpoint(save_last=True)
    trainer = SimpleNamespace(
        _signal_connector=SimpleNamespace(received_sigterm=False), checkpoint_callback=periodic, global_step=3
    )
    stop = StopCheckpoint()
    stop.on_train_start(trainer, None)
    stop._signal = signal.SIGINT  # the first Ctrl+C came in the final validation
    stop._loops_at_step_end = {}  # the run took steps before it

    def second_ctrl_c(trainer):
        signal.raise_signal(signal.SIGINT)
        raise AssertionError("not reached")

    stop._save_last = second_ctrl_c
    try:
        stop.on_train_end(trainer, None)
    except KeyboardInterrupt:
        pytest.fail("the second Ctrl+C reached Python's own handler (a traceback, exit 1)")
    except SystemExit as stopped:
        assert stopped.code == 128 + signal.SIGINT
    else:
        pytest.fail("on_train_end did not stop")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_first_ctrl_c_stops_interruptible_work_only(tmp_path):
    from types import SimpleNamespace

    from callbacks.interruptible import Interruptible
    from callbacks.stop_checkpoint import StopCheckpoint

    trainer = SimpleNamespace(_signal_connector=SimpleNamespace(received_sigterm=False))
    handler = StopCheckpoint()._sigint(trainer)
    with Interruptible() as work, Interruptible.region():
        handler(signal.SIGINT, None)
        raise AssertionError("not reached")
    assert work.interrupted and trainer._signal_connector.received_sigterm and Interruptible.regions == 0
    with Interruptible() as work:
        pass
    assert not work.interrupted
