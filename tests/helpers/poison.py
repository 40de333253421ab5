"""A device that poisons one round: honest otherwise, real training always (the gate and staged
rollout tests)."""

from __future__ import annotations

import dataclasses

from edgetune.worker import WorkloadWorker


class AscendingWorker(WorkloadWorker):
    """An honest device, except in round ``poisoned_round``: there it trains to *raise* the loss
    on its text (gradient ascent: the step it computes, reversed) with five times the step size.
    The update has the fleet's layout, finite values and the honest sample count."""

    poisoned_round = 2

    def train(self, task, env):
        update = super().train(task, env)
        if task.round != self.poisoned_round or update is None:
            return update
        # (B·A: reversing both factors' steps would leave their product's second-order term as it
        # was, so the step on B alone is reversed, which reverses the change to B·A to first order)
        return dataclasses.replace(update, delta={name: -5.0 * d if name.endswith("lora_B") else d
                                                  for name, d in update.delta.items()})
