"""``last.ckpt`` at the step where training stopped: at its end, on SIGTERM (Colab, Slurm, ``docker stop``) and Ctrl+C.

ModelCheckpoint saves every N steps, so a run whose ``max_steps`` is no multiple of N ended with a ``last.ckpt``
older than its last step (issue #8).

Lightning turns SIGTERM into a ``SIGTERMException`` at the end of the running batch, when weights, optimizer and
loop counters agree, and then exits with status 0 having saved nothing (issue #8). This callback treats the first
Ctrl+C the same way (a second one stops at once), writes ``last.ckpt`` at that point, says where it is, and makes
the exit status ``128 + signal`` as shells report it. Either signal during a validation ends the validation there
(:class:`callbacks.interruptible.Interruptible`), so that the checkpoint is written before a SIGKILL follows.

Checkpoints saved once the epoch loop has ended (this one's at the end of training, ``best_identity.ckpt`` of the
final validation) carry the loop counters of the last step's end, as a periodic save has them: by then Lightning
has counted the epoch as finished, and a run extended from such a file started the next epoch, skipping the rest
of this one (a whole epoch when training stopped at its end).

Under gradient accumulation a signal can arrive between an optimizer step's micro-batches, and Lightning stops
there: the weights and optimizer are those of the last step, but the loop counters, the data position and the RNG
had moved on, and a resume skipped the batches of the unfinished step (their gradients were never applied). Such
a checkpoint stands for the last step's end: its loop counters and RNG states are those recorded there, and
:class:`datamodules.face_data_module.FaceDataModule` rewinds its data position to the step's first batch, so a
resume trains the unfinished step again, whole. Waiting for the step's end instead could outlast the few seconds
``docker stop`` or Slurm give before their SIGKILL. A signal before this run's first step ended saves nothing: no
step was taken since the run started (from scratch or from the checkpoint it resumed).
"""

from __future__ import annotations

import copy
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.interruptible import Interruptible, WorkInterrupted
from callbacks.run_folders import checkpoint_dir


class StopCheckpoint(L.Callback):
    """Saves ``<checkpoint dir>/last.ckpt`` at the last step of training when the periodic save was earlier; on
    SIGTERM or Ctrl+C finishes the step, saves it and exits with ``128 + signal``."""

    def __init__(self) -> None:
        self._signal: int | None = None
        self._previous: dict[int, Any] = {}
        self._loops_at_step_end: dict[str, Any] | None = None
        self._rng_at_step_end: dict[str, Any] | None = None
        self._epoch_ended = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.arm(trainer)

    def arm(self, trainer: L.Trainer) -> None:
        """Install the SIGINT and SIGTERM handlers for this fit, once: at the start of training, or before it by
        work that comes first and must be stoppable (the baseline validation, :func:`arm_signal_handlers`)."""
        if self._previous:
            return
        self._signal = None
        # Lightning's SIGTERM handler is in place by now (the trainer registers it before the loop starts): ours
        # calls it, and also stops a validation under way (``docker stop`` and Slurm kill a few seconds later).
        for signum, handler in ((signal.SIGINT, self._sigint(trainer)), (signal.SIGTERM, self._sigterm(trainer))):
            try:
                self._previous[signum] = signal.signal(signum, handler)
            except ValueError:  # not the main thread: leave the signals to Lightning
                break

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_ended = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if _inside_a_step(trainer):
            return  # between micro-batches: the step has not ended
        # A few dozen counters: cheap to copy at every step, and the step that turns out to be the last is known
        # only later (max_steps, should_stop, the epoch's last batch).
        self._loops_at_step_end = copy.deepcopy(trainer.fit_loop.state_dict())
        if trainer.accumulate_grad_batches > 1:  # a stop between micro-batches rewinds the RNG to here
            self._rng_at_step_end = {"torch": torch.get_rng_state()}
            if torch.cuda.is_available():  # host-side generator states: no wait for the GPU
                self._rng_at_step_end["cuda"] = torch.cuda.get_rng_state_all()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_ended = True

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if "loops" not in checkpoint:
            return
        # Weights, optimizer, RNG and data position are those of the last step's end; so must the loop counters be.
        inside = _inside_a_step(trainer)
        if (self._epoch_ended or inside) and self._loops_at_step_end is not None:
            checkpoint["loops"]["fit_loop"] = copy.deepcopy(self._loops_at_step_end)
        if inside and self._rng_at_step_end is not None:
            # Only the stop saves between micro-batches (periodic and best checkpoints are taken at a step's end), and
            # nothing draws a random number after it: the module's hook, next, saves the generators as rewound here.
            torch.set_rng_state(self._rng_at_step_end["torch"])
            if "cuda" in self._rng_at_step_end:
                torch.cuda.set_rng_state_all(self._rng_at_step_end["cuda"])
        _count_the_running_epoch(checkpoint["loops"]["fit_loop"])

    def _sigint(self, trainer: L.Trainer):
        def handler(signum: int, frame: Any) -> None:
            if self._signal is not None:
                # Asked twice: stop now, without a checkpoint, with the status a shell gives Ctrl+C (130). Not a
                # KeyboardInterrupt: Lightning would turn that into exit status 1, an error to a script or a queue.
                rank_zero_info("\nCtrl+C again: stopping now, without a checkpoint.")
                raise SystemExit(128 + signum)
            self._signal = signum
            trainer._signal_connector.received_sigterm = True  # Lightning's own stop-after-this-batch path
            if Interruptible.stoppable():
                rank_zero_info("\nCtrl+C: validation stopped; a checkpoint is saved next (Ctrl+C again: stop at once).")
                raise WorkInterrupted
            rank_zero_info("\nCtrl+C: a checkpoint is saved when this step ends (press Ctrl+C again to stop at once).")

        return handler

    def _sigterm(self, trainer: L.Trainer):
        lightning = signal.getsignal(signal.SIGTERM)

        def handler(signum: int, frame: Any) -> None:
            if callable(lightning):
                lightning(signum, frame)  # sets received_sigterm; tells the other ranks
            trainer._signal_connector.received_sigterm = True
            if self._signal is None:
                self._signal = signum
            if Interruptible.stoppable():
                rank_zero_info("\nSIGTERM: validation stopped; a checkpoint is saved next.")
                raise WorkInterrupted

        return handler

    def _restore_signals(self) -> None:
        while self._previous:
            signum, handler = self._previous.popitem()
            if handler is not None:  # None: a handler not set from Python, which cannot be put back
                signal.signal(signum, handler)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Our handlers stay while the checkpoint is written: a second Ctrl+C then stops with 130, not a traceback
        # (the write is atomic: an older last.ckpt stays whole).
        periodic = trainer.checkpoint_callback
        ours = isinstance(periodic, ModelCheckpoint)
        path = None
        try:
            # ModelCheckpoint's own on_train_end saves only when it never saved a last.ckpt.
            unsaved = not ours or periodic._last_global_step_saved != trainer.global_step
            # After a signal the last step is saved whatever checkpoint.save_last says, as during training.
            wanted = self._signal is not None or (ours and periodic.save_last)
            if unsaved and wanted and not self._nothing_to_save(trainer):
                path = self._save_last(trainer)
        finally:
            self._restore_signals()
        if self._signal is not None:  # a signal after the last step, in the final validation
            if self._nothing_to_save(trainer):
                self._say_nothing_saved(trainer, signal.Signals(self._signal).name)
                raise SystemExit(128 + self._signal)
            if path is None:  # the periodic save had this step
                path = Path(periodic._last_checkpoint_saved or checkpoint_dir(trainer) / "last.ckpt")
            rank_zero_info(f"Stopped by {signal.Signals(self._signal).name} after the last step; checkpoint: {path}")
            raise SystemExit(128 + self._signal)

    @staticmethod
    def _save_last(trainer: L.Trainer) -> Path:
        """Save ``last.ckpt`` through the ModelCheckpoint when there is one (it then knows the file as its own and
        does not version the next one ``last-v1.ckpt``); every rank takes part, rank 0 writes."""
        periodic = trainer.checkpoint_callback
        if isinstance(periodic, ModelCheckpoint) and periodic.save_last:
            periodic._save_last_checkpoint(trainer, periodic._monitor_candidates(trainer))
            return Path(periodic.last_model_path)
        path = checkpoint_dir(trainer) / "last.ckpt"
        trainer.save_checkpoint(path)
        return path

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or not trainer.training:
            self._restore_signals()
            return
        signum = self._signal or signal.SIGTERM
        name = signal.Signals(signum).name
        exception.code = 128 + signum
        if self._nothing_to_save(trainer):
            self._restore_signals()
            self._say_nothing_saved(trainer, name)
            return
        try:
            path = self._save_last(trainer)
        finally:
            self._restore_signals()
        redo = ""
        if _inside_a_step(trainer):
            batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed % trainer.accumulate_grad_batches
            redo = f" ({batches} micro-batch(es) of step {trainer.global_step + 1} are trained again on resume)"
        rank_zero_info(
            f"Stopped by {name} after step {trainer.global_step}{redo}; checkpoint saved: {path}\n"
            f"Resume with: --ckpt_path {path}"
        )

    @staticmethod
    def _say_nothing_saved(trainer: L.Trainer, name: str) -> None:
        again = f"resume with --ckpt_path {trainer.ckpt_path} again" if trainer.ckpt_path else "start it again"
        rank_zero_info(f"Stopped by {name} before this run finished an optimizer step: nothing to save ({again}).")

    def _nothing_to_save(self, trainer: L.Trainer) -> bool:
        """Stopped between the micro-batches of this run's first optimizer step: no step to save (module docstring)."""
        return self._loops_at_step_end is None and _inside_a_step(trainer)


def _inside_a_step(trainer: L.Trainer) -> bool:
    """Whether training stands between the micro-batches of an optimizer step (gradient accumulation)."""
    return trainer.training and trainer.fit_loop.epoch_loop._should_accumulate()


def _count_the_running_epoch(fit_loop: dict[str, Any]) -> None:
    """Count the epoch a checkpoint saved mid-epoch is in as started, as Lightning does in a run never resumed.

    A run resumed from a checkpoint of an epoch's last batch (every one of brad.yaml's: 50 batches an epoch, a save
    every 500 steps) finishes that epoch on restart and then runs the next without counting it as started
    (Lightning 2.6, ``FitLoop.on_advance_start`` in its restarted-mid-epoch branch). Its checkpoints then read as
    saved between epochs, and a second resume trained that epoch again from its start.
    """
    if not fit_loop.get("epoch_loop.batch_progress", {}).get("current", {}).get("ready"):
        return  # before the first batch of an epoch: nothing is running
    for counts in fit_loop.get("epoch_progress", {}).values():
        if isinstance(counts, dict) and counts.get("started") == counts.get("processed") == counts.get("completed"):
            counts["ready"] = counts["started"] = counts["completed"] + 1


def arm_signal_handlers(trainer: L.Trainer) -> None:
    """Arm the run's :class:`StopCheckpoint` now, if it has one: for work before its ``on_train_start`` runs."""
    for callback in trainer.callbacks:
        if isinstance(callback, StopCheckpoint):
            callback.arm(trainer)
