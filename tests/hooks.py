"""Callbacks that tests put into a training process (``--trainer.callbacks``), so they act at a known point
instead of after a guessed delay."""

from __future__ import annotations

import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class PauseAt(Callback):
    """At batch ``batch`` of epoch ``epoch``: write ``flag`` and wait, so a test can kill the process exactly there.
    Only once: a resumed run that finds the flag goes on."""

    def __init__(self, epoch: int, batch: int, flag: str) -> None:
        self.epoch, self.batch, self.flag = epoch, batch, Path(flag)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:  # noqa: ANN001
        if trainer.current_epoch == self.epoch and batch_idx == self.batch and not self.flag.exists():
            self.flag.write_text(f"paused at epoch {self.epoch}, batch {self.batch}")
            time.sleep(3600)
