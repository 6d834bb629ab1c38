"""``last.ckpt`` at the step where training stopped: at its end, on SIGTERM (Colab, Slurm, ``docker stop``) and Ctrl+C.

ModelCheckpoint saves every N steps, so a run whose ``max_steps`` is no multiple of N ended with a ``last.ckpt``
older than its last step (issue #8).

Lightning turns SIGTERM into a ``SIGTERMException`` at the end of the running batch, when weights, optimizer and
loop counters agree, and then exits with status 0 having saved nothing (issue #8). This callback treats the first
Ctrl+C the same way (a second one stops at once), writes ``last.ckpt`` at that point, says where it is, and makes
the exit status ``128 + signal`` as shells report it.

Checkpoints saved once the epoch loop has ended (this one's at the end of training, ``best_identity.ckpt`` of the
final validation) carry the loop counters of the last step's end, as a periodic save has them: by then Lightning
has counted the epoch as finished, and a run extended from such a file started the next epoch, skipping the rest
of this one (a whole epoch when training stopped at its end).
"""

from __future__ import annotations

import copy
import signal
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.run_folders import checkpoint_dir


class StopCheckpoint(L.Callback):
    """Saves ``<checkpoint dir>/last.ckpt`` at the last step of training when the periodic save was earlier; on
    SIGTERM or Ctrl+C finishes the step, saves it and exits with ``128 + signal``."""

    def __init__(self) -> None:
        self._signal: int | None = None
        self._previous_sigint: Any = None
        self._loops_at_step_end: dict[str, Any] | None = None
        self._epoch_ended = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._signal = None
        try:
            self._previous_sigint = signal.signal(signal.SIGINT, self._sigint(trainer))
        except ValueError:  # not the main thread: leave Ctrl+C to Lightning
            self._previous_sigint = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_ended = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # A few dozen counters: cheap to copy at every step, and the step that turns out to be the last is known
        # only later (max_steps, should_stop, the epoch's last batch).
        self._loops_at_step_end = copy.deepcopy(trainer.fit_loop.state_dict())

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_ended = True

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Weights, optimizer, RNG and data position are those of the last step's end; so must the loop counters be.
        if self._epoch_ended and self._loops_at_step_end is not None and "loops" in checkpoint:
            checkpoint["loops"]["fit_loop"] = copy.deepcopy(self._loops_at_step_end)

    def _sigint(self, trainer: L.Trainer):
        def handler(signum: int, frame: Any) -> None:
            if self._signal is not None:
                # Asked twice: stop now, without a checkpoint, with the status a shell gives Ctrl+C (130). Not a
                # KeyboardInterrupt: Lightning would turn that into exit status 1, an error to a script or a queue.
                rank_zero_info("\nCtrl+C again: stopping now, without a checkpoint.")
                raise SystemExit(128 + signum)
            self._signal = signum
            rank_zero_info("\nCtrl+C: a checkpoint is saved when this step ends (press Ctrl+C again to stop at once).")
            trainer._signal_connector.received_sigterm = True  # Lightning's own stop-after-this-batch path

        return handler

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_sigint()
        periodic = trainer.checkpoint_callback
        # ModelCheckpoint's own on_train_end saves only when it never saved a last.ckpt.
        stale = isinstance(periodic, ModelCheckpoint) and periodic._last_global_step_saved != trainer.global_step
        if stale and periodic.save_last:
            self._save_last(trainer)

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
        self._restore_sigint()
        if not isinstance(exception, SIGTERMException) or not trainer.training:
            return
        signum = self._signal or signal.SIGTERM
        path = self._save_last(trainer)
        rank_zero_info(
            f"Stopped by {signal.Signals(signum).name} after step {trainer.global_step}; checkpoint saved: {path}\n"
            f"Resume with: --ckpt_path {path}"
        )
        exception.code = 128 + signum
