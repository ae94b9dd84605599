"""The schedule shared by the warm-up callbacks (:mod:`.kl_warmup`, :mod:`.diffusion_warmup`): a setting of the
model or objective differs from its configured value for the first K optimizer steps.

Each subclass reads the configured setting at the first training batch (:meth:`Warmup.start`) and says what the
setting is at an optimizer step (:meth:`Warmup.apply`; ``None``: the configured value). This class calls them from
Lightning's hooks, so that every warm-up behaves alike: the step's value before each training batch, the configured
value during validation (``best.ckpt`` compares like with like) and after training, also after a failure.
"""

from __future__ import annotations

import lightning as L

__all__ = ["Warmup"]


class Warmup(L.Callback):
    """A setting changed for the first ``steps`` optimizer steps (subclasses: :meth:`start` and :meth:`apply`)."""

    name = "warm-up"  # in the error message of a bad step count

    def __init__(self, steps: int):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"{self.name} steps must be a positive int, got {steps!r}")
        self.steps = steps
        self._started = False

    def start(self, pl_module) -> None:
        """Read (and check) the configured setting, once, at the first training batch."""

    def apply(self, pl_module, step: int | None) -> None:
        """Set the setting for optimizer step ``step`` (0-based); ``None``: its configured value."""
        raise NotImplementedError

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self._started:
            self.start(pl_module)
            self._started = True
        self.apply(pl_module, trainer.global_step)

    def on_validation_start(self, trainer, pl_module) -> None:
        if self._started:
            self.apply(pl_module, None)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._started:
            self.apply(pl_module, trainer.global_step)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._started:
            self.apply(pl_module, None)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.on_train_end(trainer, pl_module)
