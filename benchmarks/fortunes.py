"""A small simulated fleet on real text: one ``fortunes`` category per device.

Shared by ``benchmarks/importance.py`` and ``benchmarks/strategies.py``. The text is the
Debian ``fortunes`` package (``/usr/share/games/fortunes/<category>``: plain text, entries
separated by lines holding only ``%``). Categories differ in topic and style, so a fleet with
one category per device is non-IID in a way real deployments are.

Rounds are played in process, without the daemon or a transport, but each device follows the
device-side rule of ``edgetune.worker.WorkloadWorker._start_model`` (``AdapterKind.training_start``): a device of rank r in a fleet of
rank R trains the leading r components of the global adapter with alpha·r/R, the rest and the
global's frozen ``merged`` delta applied frozen, and sends ``trained − start``. The global model
is evaluated at the fleet rank, as ``WorkloadWorker.evaluate`` does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("fortunes")

from edgetune.data.fortunes import DEFAULT_CATEGORIES, FORTUNES, load_category as _load  # noqa: F401


def load_category(category: str, root: Path = FORTUNES) -> list[str]:
    """The entries of one category (``edgetune.data.fortunes``); exits with the reason if absent."""
    try:
        return _load(category, root)
    except FileNotFoundError as exc:
        raise SystemExit(str(exc)) from None


@dataclass
class Device:
    """One simulated device: its category, its workload (own copy of the base) and its rank."""

    name: str
    workload: object  # edgetune.workload.Workload
    rank: int
    eval_blocks: np.ndarray  # (N, seq_len) held-out blocks, capped

    @property
    def num_samples(self) -> int:
        return self.workload.num_samples


def make_devices(categories: Sequence[str], ranks: Sequence[int], seq_len: int, eval_blocks: int,
                 threads: int, seed: int = 0) -> list[Device]:
    """One device per category, each with its own ``load_model(None)`` (the trainer wraps the
    base in place, so devices of different ranks cannot share one), 10 % of entries held out."""
    from edgetune.data import split_heldout
    from edgetune.models import load_model
    from edgetune.workload import Workload

    devices = []
    for category, rank in zip(categories, ranks, strict=True):
        train, heldout = split_heldout(load_category(category), 0.1, seed=seed)
        workload = Workload(load_model(None), train, heldout, threads=threads, model_ref="default")
        blocks = workload.heldout_blocks(seq_len)[:eval_blocks]
        devices.append(Device(category, workload, rank, blocks))
        log.info("%s: %d training entries, %d held-out entries (%d eval blocks of %d tokens), rank %d",
                 category, len(train), len(heldout), len(blocks), seq_len, rank)
    return devices


def start_model(device: Device, spec, tensors: dict, merged: dict):
    """The device's trainer holding the global model with its leading ``device.rank``
    components trainable, and the starting factors (``WorkloadWorker._start_model``)."""
    from edgetune.adapters.registry import adapter_kind

    begin = adapter_kind(spec).training_start(spec, tensors, merged, device.rank)
    trainer = device.workload.trainer(begin.spec)
    trainer.set_adapter(begin.tensors)
    trainer.set_merged(begin.merged)
    return trainer, begin.tensors


def train_round(devices: Sequence[Device], spec, tensors: dict, merged: dict, streams: dict[str, Iterator],
                settings, strategy, seed: int) -> tuple[dict, dict, dict]:
    """One federated round: every device trains from the global ``(tensors, merged)`` on the
    next batches of its stream, ``strategy`` merges the deltas. Returns the next global
    ``(tensors, merged)`` and per-round figures (seconds, bytes up and down, losses)."""
    from edgetune_aggregator.strategies import RoundStart

    round_start = RoundStart(dict(tensors), dict(merged), spec.scale, seed=seed)
    merge = strategy.begin(round_start)
    figures = {"train_s": 0.0, "uplink_bytes": {}, "mean_loss": {}}
    for device in devices:
        trainer, start = start_model(device, spec, tensors, merged)
        result = trainer.train(streams[device.name], settings)
        trained = trainer.get_adapter()
        delta = {name: trained[name] - start[name] for name in trained}
        merge.add(delta, device.num_samples)
        figures["train_s"] += result.seconds
        figures["uplink_bytes"][device.name] = sum(a.nbytes for a in delta.values())
        figures["mean_loss"][device.name] = result.mean_loss
    result = strategy.finish(merge)
    return result.tensors, result.merged, figures


def evaluate(devices: Sequence[Device], evaluator: Device, spec, tensors: dict, merged: dict) -> dict[str, float]:
    """Held-out perplexity of the global model on every device's blocks, at the fleet rank
    (``evaluator`` must have rank ``spec.rank``; its trainer holds the global, exactly)."""
    if evaluator.rank != spec.rank:
        raise ValueError(f"evaluate with a device of the fleet rank {spec.rank}, not {evaluator.rank}")
    trainer, _ = start_model(evaluator, spec, tensors, merged)
    return {device.name: trainer.perplexity(device.eval_blocks) for device in devices}


def weighted_mean(values: dict[str, float], devices: Sequence[Device]) -> float:
    """Sample-weighted mean over devices (the weights FedAvg gives them)."""
    weights = {d.name: d.num_samples for d in devices}
    return sum(values[n] * weights[n] for n in values) / sum(weights[n] for n in values)


def streams(devices: Sequence[Device], settings, seed: int) -> dict[str, Iterator]:
    """Each device's batch stream; the same ``seed`` gives every compared arm the same batches."""
    return {d.name: d.workload.batches(settings, seed=seed + i) for i, d in enumerate(devices)}


def nbytes(tensors: dict) -> int:
    return int(sum(np.asarray(a).nbytes for a in tensors.values()))
