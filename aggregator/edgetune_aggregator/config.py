"""The daemon's settings: one frozen dataclass, checked as a whole when made (a strategy that
cannot merge the adapter, robust aggregation with an exact strategy, … are refused here with
a message that says what would work)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from edgetune.planning.layout import GPT2_KINDS, LLAMA_KINDS
from edgetune.adapters.registry import KINDS, adapter_kind
from edgetune.wire import (DEFAULT_MAX_PACKET, DELTA_PRECISIONS, AdapterSpec, ImportanceSettings, LoraSpec, ModelManifest,
                           TrainSettings)

from .strategies import DEFAULT_SERVER_OPTIMIZER, STRATEGIES, ServerOptimizerConfig, make_strategy
from .strategies.robust import ROBUST_METHODS
from .canary import RolloutSettings
from .gate import GateSettings
from .guard import DEFAULT_CHANGE_RATIO
from .influence import InfluenceBounds
from .validation import UpdateLimits

#: refuse a fleet whose adapter would be larger than this (a hostile or mistaken hello)
MAX_ADAPTER_PARAMETERS = 200_000_000
#: weight matrices an importance-based layout chooses among (Llama-style and GPT-2 names)
DEFAULT_CANDIDATES = LLAMA_KINDS + GPT2_KINDS
LAYOUTS = ("fixed", "importance")
PLAN_MODES = ("auto", "weakest", "uniform")
DELTA_PRECISION_MODES = ("auto", *DELTA_PRECISIONS)
#: "auto": each new global version is served as soon as it is stored (and passes the gate);
#: "manual": only ``edgetune-aggregator promote`` changes what the fleet serves
PROMOTE_MODES = ("auto", "manual")


@dataclass(frozen=True)
class AggregatorConfig:
    fleet: str
    state_dir: Path
    #: train rounds to run, then evaluate and finish; None runs until stopped
    rounds: int | None = None
    #: updates needed to close a round early and to aggregate at all
    min_devices: int = 1
    #: devices to wait for before the first round (None: min_devices); a fleet that should
    #: start together (the demo) waits for all, and still closes rounds with fewer
    start_devices: int | None = None
    round_timeout_s: float = 600.0
    #: how long to wait for the first ``min_devices`` devices (None: forever)
    join_timeout_s: float | None = None
    #: a LoRA (LoraSpec) or a soft prompt (PromptSpec)
    adapter: AdapterSpec = field(default_factory=LoraSpec)
    train: TrainSettings = field(default_factory=TrainSettings)
    seed: int = 0
    max_packet: int = DEFAULT_MAX_PACKET
    #: after the last round, have every device evaluate the final global adapter
    evaluate_final: bool = True
    #: written into the PEFT adapter_config.json so users know which base it belongs to
    base_model: str = ""
    #: plan each device's rank, quantization and batch from the profile in its hello
    planning: bool = True
    #: how: "auto" (each device its best configuration), "weakest" (the one configuration every
    #: device can run, steps included), "uniform" (the fleet's own settings; devices they do
    #: not fit in memory sit out). The last two are the baselines docs/benchmarks.md measures.
    plan: str = "auto"
    #: fleet-wide MB of updates per round the planner must stay within (None: unlimited)
    uplink_budget_mb: float | None = None
    #: how updates are merged: fedit, hetlora, stack, svd, or "auto" (hetlora when planning, else
    #: fedit: what the FedPipe benchmark's strategy sweep found best, docs/benchmarks.md)
    strategy: str = "auto"
    #: how a round's merged update moves the global (default FedAvgM β 0.5: the fleet benchmark's best)
    server_optimizer: ServerOptimizerConfig = DEFAULT_SERVER_OPTIMIZER
    #: "fixed": adapters on adapter.target_modules; "importance": a calibration round scores
    #: the candidates and picks matrices within adapter_budget (docs/importance.md)
    layout: str = "fixed"
    importance: ImportanceSettings = field(default_factory=ImportanceSettings)
    layout_candidates: tuple[str, ...] = DEFAULT_CANDIDATES
    #: adapter parameters the importance layout may use (None: as many as the fixed layout)
    adapter_budget: int | None = None
    #: ONNX Runtime artifacts (``edgetune build-ort``) to serve to devices without PyTorch
    ort_artifacts: Path | None = None
    #: after the fleet finishes, keep recording devices' personalization reports (and serving
    #: artifacts) this many seconds (None: until stopped)
    linger_s: float | None = 0.0
    #: the fleet's device public keys (``device_keys.json``): with them every device message
    #: that shapes the fleet must be signed (docs/security.md); None: no signatures checked
    device_keys: Path | None = None
    #: the fleet key (``aggregator/fleet.key`` from ``provision``): the daemon signs what it
    #: publishes, and devices holding ``fleet.pub`` accept only that (docs/security.md); None: unsigned
    fleet_key: Path | None = None
    #: the fleet's model, pinned (fleet_model.py); None: the default model's manifest, or the
    #: first admitted hello's when ``model_from_first_hello`` (trusted labs only)
    model: ModelManifest | None = None
    model_from_first_hello: bool = False
    #: the devices that may join (None: any device, or those of ``device_keys`` when signing);
    #: for fleets without keys that still want to know who is theirs (docs/security.md)
    admit: frozenset[str] | None = None
    #: bounds on every update: norm (clip or reject) and sample count
    limits: UpdateLimits = field(default_factory=UpdateLimits)
    #: bounds relative to the round: claimed samples and update norm against the round's
    #: median (influence.py); on by default, so one device cannot dominate a round
    influence: InfluenceBounds = field(default_factory=InfluenceBounds)
    #: the candidate global may move at most this multiple of what the round's typical accepted
    #: update (the lower median) would move alone (guard.py); None: only finiteness and layout are checked
    max_global_change: float | None = DEFAULT_CHANGE_RATIO
    #: None: the strategy's weighted mean; "median" or "trimmed_mean": coordinate-wise robust
    #: combination (fedit and dense strategies only, see strategies/robust.py)
    robust: str | None = None
    #: fraction of values dropped at each end of every coordinate by "trimmed_mean"
    trim: float = 0.1
    #: close a round early once this fraction of the devices it tasked answered (and at least
    #: ``min_devices``); None: as soon as ``min_devices`` answered
    quorum: float | None = None
    #: FedBuff-style staleness: an update that arrives after its round closed, trained on a
    #: global at most this many versions old, is folded into the open round with its weight
    #: times (1 + lag)^-staleness_exponent; 0: late updates are refused (stale_round)
    max_staleness: int = 0
    staleness_exponent: float = 0.5
    #: decoded messages waiting for the round loop, in bytes: beyond it the broker holds them
    inbox_bytes: int = 16 << 20
    #: unfinished chunked payloads held, in bytes (at least 4 results' worth); with the inbox,
    #: what bounds the daemon's memory under a flood (docs/security.md)
    reassembly_bytes: int = 32 << 20
    #: updates come from aggregator workers (``worker.py``: a shared subscription, each worker
    #: journaling and merging its share), not straight from the devices
    workers: bool = False
    #: how long the close of a round waits for every worker holding its updates to send its
    #: share of the merge (a killed worker is restarted by then); past it the round fails and its
    #: results go on into the next round
    merge_timeout_s: float = 300.0
    #: threads that verify and decode payloads between the network thread and the round loop
    #: (receiver.py); 0: on the network thread
    intake_threads: int = 2
    #: most messages the round loop takes from its inbox at once: their results are journaled
    #: with one fsync (group commit) before any of them is acknowledged
    commit_batch: int = 64
    #: exact strategies (stack, svd): the most components per layer of the frozen delta a
    #: device downloads. None: the adapter's rank, so a device downloads at most twice what
    #: fedit sends; -1: unbounded (exact, but the downlink grows every round)
    merged_rank: int | None = None
    #: what deltas travel as: "fp32" (exact), "fp16", or "int8" (one scale per block of 128
    #: values; devices carry what it drops into their next update), both ways; "auto": the global
    #: adapter in float32, each planned device's update in what its uplink calls for (float32
    #: unless quantizing buys it training steps or the fleet its uplink budget). The bounds are in
    #: docs/protocol.md, what each costs in quality in docs/benchmarks.md
    delta_precision: str = "auto"
    #: how new versions reach what devices serve (``PROMOTE_MODES``, docs/operations.md)
    promote: str = "auto"
    #: the validation gate a version passes before it is served (``gate.py``)
    gate: GateSettings = field(default_factory=GateSettings)
    #: staged rollout: who serves a promoted version first (``canary.py``)
    rollout: RolloutSettings = field(default_factory=RolloutSettings)

    def merged_rank_for(self, adapter: AdapterSpec) -> int | None:
        """The cap an exact strategy gets (None: unbounded)."""
        rank = adapter_kind(adapter).rank(adapter)
        if self.merged_rank == -1 or rank is None:
            return None
        return rank if self.merged_rank is None else self.merged_rank

    @property
    def downlink_precision(self) -> str:
        """What the global adapter travels as (every device reads it)."""
        return "fp32" if self.delta_precision == "auto" else self.delta_precision

    @property
    def update_precisions(self) -> tuple[str, ...]:
        """What the planner may choose among for a device's update."""
        return DELTA_PRECISIONS if self.delta_precision == "auto" else (self.delta_precision,)

    @property
    def strategy_name(self) -> str:
        if self.strategy == "auto":
            # The kind decides (``AdapterKind.auto_strategy``). Ranks are mixed only when planning
            # with FedAvg: FedSGD averages gradients of the factors, which fedit's factor average
            # is, and robust combination is coordinate-wise over plain factors (fedit) too.
            mixed = self.planning and self.train.algorithm == "fedavg" and self.robust is None
            return adapter_kind(self.adapter).auto_strategy(mixed)
        return self.strategy

    def __post_init__(self) -> None:
        if self.promote not in PROMOTE_MODES:
            raise ValueError(f"promote {self.promote!r} is not one of {', '.join(PROMOTE_MODES)}")
        if self.strategy != "auto" and self.strategy not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r} is not one of auto, {', '.join(STRATEGIES)}")
        strategy = make_strategy(self.strategy_name, self.server_optimizer)  # raises for an incompatible optimizer
        kind = adapter_kind(self.adapter)
        if strategy.name not in kind.strategies:
            fits = [name for name in STRATEGIES if name in kind.strategies]
            merges = [name for name, other in KINDS.items() if strategy.name in other.strategies]
            raise ValueError(f"strategy {strategy.name} merges {'/'.join(merges)} adapters, not "
                             f"{self.adapter.kind}: use {' or '.join(fits)} (or auto)")
        if self.train.algorithm == "fedsgd" and strategy.name not in ("fedit", "dense"):
            raise ValueError(f"FedSGD sends gradients, which only a plain average combines: strategy "
                             f"{strategy.name} would treat them as trained factors; use fedit (or auto)")
        if self.layout != "fixed" and not adapter_kind(self.adapter).has_layout:
            raise ValueError(f"an importance layout chooses weight matrices for LoRA; a {self.adapter.kind} adapter "
                             "has none")
        if self.plan not in PLAN_MODES:
            raise ValueError(f"plan {self.plan!r} is not one of {', '.join(PLAN_MODES)}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout {self.layout!r} is not one of {', '.join(LAYOUTS)}")
        if self.adapter_budget is not None and self.adapter_budget < 1:
            raise ValueError(f"adapter_budget must be ≥ 1, got {self.adapter_budget}")
        if self.min_devices < 1:
            raise ValueError(f"min_devices must be ≥ 1, got {self.min_devices}")
        if self.start_devices is not None and self.start_devices < 1:
            raise ValueError(f"start_devices must be ≥ 1, got {self.start_devices}")
        if self.rounds is not None and self.rounds < 0:
            raise ValueError(f"rounds must be ≥ 0, got {self.rounds}")
        if self.round_timeout_s <= 0:
            raise ValueError(f"round_timeout_s must be > 0, got {self.round_timeout_s}")
        if self.linger_s is not None and self.linger_s < 0:
            raise ValueError(f"linger_s must be ≥ 0 (None: until stopped), got {self.linger_s}")
        if self.workers and self.robust is not None:
            raise ValueError(f"robust aggregation ({self.robust}) needs every delta at once, so it cannot be merged "
                             "in shares by workers: run one aggregator process, or the weighted mean")
        if self.robust is not None:
            if self.robust not in ROBUST_METHODS:
                raise ValueError(f"robust {self.robust!r} is not one of {', '.join(ROBUST_METHODS)}")
            if strategy.name not in ("fedit", "dense"):
                raise ValueError(f"robust aggregation combines deltas coordinate-wise, which the averaging "
                                 f"strategies fedit and dense do; strategy {strategy.name} merges products "
                                 "exactly: use --strategy fedit (or dense for prompts)")
            if not 0.0 <= self.trim < 0.5:
                raise ValueError(f"trim must be in [0, 0.5), got {self.trim}")
        if self.max_staleness < 0 or not (math.isfinite(self.staleness_exponent) and self.staleness_exponent >= 0):
            raise ValueError(f"max_staleness must be ≥ 0 and staleness_exponent finite and ≥ 0, got "
                             f"{self.max_staleness} and {self.staleness_exponent}")
        if self.max_staleness and strategy.name not in ("fedit", "dense"):
            raise ValueError(f"late updates are folded in as deltas of an older global, which the averaging "
                             f"strategies fedit and dense can do; strategy {strategy.name} rebuilds each device's "
                             "factors from the round's start: use --strategy fedit (or dense for prompts)")
        if self.merged_rank is not None and self.merged_rank < -1:
            raise ValueError(f"merged_rank must be ≥ 0, -1 (unbounded) or None (the adapter's rank), got {self.merged_rank}")
        if self.max_global_change is not None and not (math.isfinite(self.max_global_change)
                                                       and self.max_global_change >= 1.0):
            raise ValueError(f"max_global_change must be a finite number ≥ 1 (None: unbounded), got "
                             f"{self.max_global_change}")
        if self.model is not None and self.model_from_first_hello:
            raise ValueError("pin the fleet's model (model) or take the first hello's (model_from_first_hello), not both")
        if self.delta_precision not in DELTA_PRECISION_MODES:
            raise ValueError(f"delta_precision {self.delta_precision!r} is not one of {', '.join(DELTA_PRECISION_MODES)}")
        if self.quorum is not None and not 0.0 < self.quorum <= 1.0:
            raise ValueError(f"quorum must be in (0, 1], got {self.quorum}")
