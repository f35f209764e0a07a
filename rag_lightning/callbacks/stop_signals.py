"""Stop signals during training: every rank stops at the same step boundary, and no handler runs a collective.

Lightning's own SIGTERM handler broadcasts a tensor from inside the handler, wherever the signal lands. When it
lands inside another collective (the barrier of a checkpoint callback, the gradients' all-reduce), the ranks wait
on each other for ever: a SIGTERM (what scancel sends) or a Ctrl+C to a DDP job hung both ranks. While training
runs, this callback's handler only takes note of SIGTERM and SIGINT (errors.record_stop); at the start of every
training step, and when training ends, the ranks agree on the signal any of them got (one all-reduce of a number)
and all stop there together. The command then reports the stop in one line, as for any signal (rag_lightning.errors).

It handles only the signals the command's own handler had before fit: a launcher's handler (submitit's) is left as
it is. Lightning restores the handlers it found when fit ends, whichever way it ends.
"""

from __future__ import annotations

import signal
import threading

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from rag_lightning import errors


class StopTogether(L.Callback):
    def __init__(self):
        self._owned: list[int] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # called before Lightning installs its own handlers
        self._owned = [s for s in errors.STOP_SIGNALS if errors.handles_stop_signal(s)]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum in self._owned:
                signal.signal(signum, self._take_note)

    @staticmethod
    def _take_note(signum: int, frame) -> None:
        errors.record_stop(signum)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._stop_if_signalled(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_signalled(trainer, pl_module)  # a signal during the last validation

    @staticmethod
    def _stop_if_signalled(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        received = torch.tensor(float(errors.stop_received() or 0), device=pl_module.device)
        signum = int(trainer.strategy.reduce(received, reduce_op="max"))
        if signum:
            errors.record_stop(signum)  # the ranks that got none stop for the one another rank got
            raise SIGTERMException()
