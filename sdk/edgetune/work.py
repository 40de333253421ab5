"""What a device computes, as the protocol sees it: a ``Worker`` answers each kind of task,
given a ``RoundEnv`` (the round's adapter, clock, deadline and ways to report); the protocol
(``edgetune.protocol``) decides when, and carries the answer. The PyTorch and ONNX Runtime
worker is ``edgetune.worker``, the light one of simulations ``edgetune.simulate``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from .clock import DeviceClock
from .wire import Capabilities, GlobalAdapter, ModelManifest, Progress, RoundTask

__all__ = ["DeadlineMissed", "RoundEnv", "Worker"]


class DeadlineMissed(Exception):
    """The round's deadline passes before training could finish: the update would be refused."""


@dataclass
class RoundEnv:
    """What the protocol offers a worker while it acts on one task."""

    device_id: str
    #: the global adapter the task's round starts from (None before the fleet has one)
    global_adapter: GlobalAdapter | None
    #: the device's clock
    clock: DeviceClock
    #: when the task arrived on this device's clock (its deadline counts from there), or None
    seen_at: float | None
    #: ``(progress)``: publish a training step's progress (QoS 0: for dashboards)
    progress: Callable[[Progress], None]
    #: ``(code, message)``: tell the aggregator something went wrong (``oom_backoff`` goes on)
    report_error: Callable[[str, str], None]
    #: ``() -> (sent, received)``: payload bytes since the last call (what an update reports)
    traffic: Callable[[], tuple[int, int]]
    #: the global version this device serves (``promoted.py``; None: none promoted): scored
    #: next to the round's global for the validation gate
    serving: GlobalAdapter | None = None
    #: ``()``: wait while the device's training policy says not now (``policy.py``); the
    #: worker calls it before every training step
    hold: Callable[[], None] = lambda: None

    def check_deadline(self, task: RoundTask, next_step_s: float) -> None:
        """Raise ``DeadlineMissed`` if another ``next_step_s`` of work would end after the
        round's deadline: the answer would be refused, and the device has better uses for its
        CPU. (With late updates allowed, it goes on.)"""
        if task.max_staleness or self.seen_at is None:
            return
        elapsed = self.clock.now() - self.seen_at
        if elapsed + next_step_s > task.deadline_s:
            raise DeadlineMissed(f"{elapsed:.0f} s into a {task.deadline_s:.0f} s round, another step "
                                 f"({next_step_s:.1f} s) would end after the deadline; stopping")


class Worker(ABC):
    """What a device computes for each kind of task: the answer to send (None: nothing, e.g.
    it sits the round out). The protocol decides when, and carries the answer."""

    @property
    @abstractmethod
    def manifest(self) -> ModelManifest:
        """The base model this device runs (announced in its hello)."""

    @property
    @abstractmethod
    def num_samples(self) -> int: ...

    def capabilities(self, max_packet: int) -> Capabilities:
        """What it trains with (announced in its hello)."""
        return Capabilities(max_packet=max_packet)

    def computing(self, task: RoundTask) -> AbstractContextManager:
        """Held while the worker acts on ``task`` (a lock, a clock that counts compute)."""
        return nullcontext()

    def calibrate(self, task: RoundTask, env: RoundEnv):
        return None

    def initialize(self, task: RoundTask, env: RoundEnv):
        return None

    @abstractmethod
    def train(self, task: RoundTask, env: RoundEnv): ...

    @abstractmethod
    def evaluate(self, task: RoundTask, env: RoundEnv): ...

    def score(self, adapters: list[GlobalAdapter]) -> list[float | None]:
        """Each adapter's perplexity on this device's held-out text, for a staged rollout's
        canary report (docs/operations.md); None where it cannot tell."""
        return [None] * len(adapters)
