"""Messages between the aggregator and its workers (``edgetune_aggregator.worker``).

Workers take the devices' updates in through an MQTT 5 shared subscription, each a share;
they verify, validate and journal them, and tell the coordinator (the daemon that runs the
rounds) what they took (``WorkerReport``); the coordinator decides and answers the device. At
the round's close it sends each worker the weights of the updates it holds (``MergeRequest``),
and each sends back the strategy's running sums of its share (``PartialMerge``), which the
coordinator adds up: one merge of every update, to float64 rounding.

They travel on ``{base}/workers/…`` (``Topics.workers``), which only the aggregator's own
processes may use (the broker's ACL: docs/deploy.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .messages import Update
from .names import check_name
from .specs import AdapterSpec, LoraSpec, ModelManifest


@dataclass(frozen=True)
class WorkerRound:
    """What the open train round takes (retained on ``{base}/workers/round``): what a worker
    needs to check an update as the coordinator would."""

    round: int
    run_id: str
    #: train round -> the global version it started from, for the rounds an update may be for
    #: (the open one, and those a late update may still come from: ``max_staleness``)
    bases: dict[str, int]
    model: ModelManifest
    adapter: AdapterSpec = field(default_factory=LoraSpec)
    #: ``UpdateLimits``: samples a device may claim, and the norm bound (None: none) and action
    min_samples: int = 1
    max_samples: int = 10_000_000
    max_norm: float | None = None
    norm_action: str = "clip"


@dataclass(frozen=True)
class WorkerReport:
    """A worker took an update in and journaled it (``journaled``), or refused it (``reason``).
    ``update`` is the device's, without its delta (its round, base version, samples, metrics)."""

    worker: str
    update: Update
    #: the device's signature nonce (b"": unsigned), so the coordinator can answer resends
    nonce: bytes
    journaled: bool
    #: the L2 norm of the delta as sent (what the weighting needs)
    norm: float = 0.0
    reason: str = ""
    detail: str = ""

    def __post_init__(self) -> None:
        check_name(self.worker, "worker id")
        if len(self.reason) > 64 or len(self.detail) > 1024 or len(self.nonce) > 64:
            raise ValueError("WorkerReport: reason ≤ 64, detail ≤ 1024 characters, nonce ≤ 64 bytes")


@dataclass(frozen=True)
class MergeRequest:
    """The close of round ``round``: merge these of your journaled updates, each scaled and
    weighted as the round's plan says, from this start (retained on ``{base}/workers/merge``)."""

    round: int
    strategy: str
    #: result name (``journal.result_name``) -> worker that holds it
    holders: dict[str, str]
    #: result name -> (delta scale, weight in the average)
    plan: dict[str, tuple[float, float]]
    start: dict[str, np.ndarray]
    merged: dict[str, np.ndarray]
    scale: float
    seed: int = 0
    #: the exact strategies' frozen-delta bound (-1: unbounded)
    merged_rank: int = -1
    #: the fleet run (``WorkerRound.run_id``): a worker ignores the close of another run's round
    run_id: str = ""


@dataclass(frozen=True)
class PartialMerge:
    """A worker's share of round ``round``'s merge: the strategy's running sums
    (``RoundMerge.partial``), and how far each of its updates alone moves the model (what the
    coordinator's guard compares the candidate global with)."""

    worker: str
    round: int
    #: the running sums' arrays, each float64 array as two float32 ones (``name``, ``name~lo``)
    sums: dict[str, np.ndarray]
    changes: dict[str, float]
    #: the names it could not read back (a journal that lost them): the coordinator fails the merge
    missing: tuple[str, ...] = ()
    #: the running sums' scalars (counts, weights), as float64
    scalars: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_name(self.worker, "worker id")


__all__ = ["MergeRequest", "PartialMerge", "WorkerReport", "WorkerRound"]
