"""Initialization rounds, for an adapter kind whose start needs the base's weights (a soft
prompt's token embeddings), which only devices hold: every device proposes the starting
adapter, and the one a strict majority agrees on becomes global v0. A device that computed
another one runs another base (or lies): it is left out of the fleet."""

from __future__ import annotations

import logging

import numpy as np

from edgetune.adapters.registry import adapter_shapes
from edgetune.adapters.tensors import as_float32, consensus
from edgetune.wire import AdapterInit, TaskKind

from ..fleet import Fleet
from ..store import DeviceRecord, RoundStatus
from ..validation import Refusal, check_layout
from .base import RoundContext, TaskHandler

log = logging.getLogger("edgetune_aggregator.daemon")


class InitializeHandler(TaskHandler):
    kind = TaskKind.INITIALIZE
    waits_for_all = True  # every device online gets a say in the fleet's start

    def __init__(self, fleet: Fleet):
        self.fleet = fleet
        self._inits: dict[str, dict] = {}
        #: the starting adapter the last round agreed on (None: none yet, or no majority)
        self.initial: dict | None = None

    def begin(self, ctx: RoundContext) -> None:
        self._inits = {}

    def check(self, message: AdapterInit, ctx: RoundContext | None) -> Refusal | None:
        return check_layout(message.tensors, adapter_shapes(self.fleet.state.adapter, self.fleet.state.model))

    def accept(self, ctx: RoundContext, message: AdapterInit, norm: float | None) -> None:
        sender = message.device_id
        ctx.seen.add(sender)
        self._inits[sender] = {name: np.array(as_float32(t), dtype=np.float32) for name, t in message.tensors.items()}
        ctx.record.devices.append(DeviceRecord(sender, 1))
        log.info("round %d: starting adapter from %s", ctx.number, sender)

    def close(self, ctx: RoundContext, enough: bool) -> None:
        if not self._inits:
            return
        record = ctx.record
        initial, disagree = consensus(self._inits)
        if initial is None:
            record.status = RoundStatus.FAILED
            record.note = f"no majority for a starting adapter: {disagree}"
            return
        self.initial = initial
        for device, why in disagree.items():
            log.warning("device %s computed another starting adapter than the fleet (%s): it is left out "
                        "of this fleet; check its base model", device, why)
        # saved with the state the fleet's v0 is saved with: a restart keeps them out
        self.fleet.update(left_out={**self.fleet.state.left_out, **disagree})
        if disagree:
            record.note = f"left out (another starting adapter): {', '.join(sorted(disagree))}"
        record.status = RoundStatus.INITIALIZED
