"""Choose each device's configuration: adapter rank, base quantization, batch size, gradient
checkpointing, local steps and the precision its update travels in, so the fleet trains as much as
it can before the round's deadline without any device running out of memory.

The formulation (``docs/planner.md`` has it in full): for device d and candidate configuration
c, the cost model predicts peak memory m(d,c) and step time t(d,c). The device can take
s(d,c) = min(S_max, ⌊(T − up(c)/bw_d) / t(d,c)⌋) steps before the deadline T, where up(c) is the
size of its update at the candidate's precision (float32, float16, or int8 with a scale per 128
values: a quarter of the bytes). The useful training is u(d,c) = s·B·L·(r/r_max)^γ: tokens trained, worth
slightly more at a higher rank (γ, default 0.1, says that data volume matters far more than
rank). Then

    maximise   Σ_d Σ_c u(d,c)·x(d,c)
    subject to Σ_c x(d,c) ≤ 1                     (one configuration per device, or none)
               m(d,c) ≤ α·M_d,  s(d,c) ≥ S_min     (only feasible pairs get a variable)
               Σ_d Σ_c up(c)·x(d,c) ≤ U            (optional fleet uplink budget per round)
               x(d,c) ∈ {0, 1}

Without the uplink budget the devices are independent and the optimum is each device's best
feasible candidate: exact enumeration. With it, the problem is a 0/1 knapsack over devices,
solved exactly with ``scipy.optimize.milp`` (HiGHS branch and bound).

Among candidates of equal utility the more precise update wins: a device quantizes its update
only where its uplink would otherwise cost it training steps, or the fleet its uplink budget
(what quantization costs in quality is measured in docs/benchmarks.md, and is small).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field

from ..wire import DELTA_PRECISIONS, QUANTIZATIONS, Capabilities, DevicePlan, DeviceProfile
from ..wire.quantize import wire_bytes
from .costmodel import (
    Arch,
    Calibration,
    Config,
    compute_dtype,
    estimate_eval_seconds,
    estimate_memory,
    estimate_step_seconds,
    lora_parameters,
)


@dataclass(frozen=True)
class PlanOptions:
    deadline_s: float
    seq_len: int = 128
    ranks: tuple[int, ...] = (2, 4, 8, 16)
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16)
    quantizations: tuple[str, ...] = QUANTIZATIONS
    checkpointing: tuple[bool, ...] = (False, True)
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    min_local_steps: int = 1
    max_local_steps: int = 50
    #: plan to at most this share of a device's memory (the model errs by up to ~15 %)
    memory_margin: float = 0.85
    #: plan to at most this share of the deadline (aggregation, stragglers, evaluation)
    time_margin: float = 0.8
    rank_exponent: float = 0.1
    #: fleet-wide bytes of updates per round; None: unlimited (devices plan independently)
    uplink_budget_bytes: float | None = None
    #: the rank utility is measured against (0: the largest of ``ranks``); a device limited to
    #: lower ranks keeps the fleet's reference so utilities compare across devices
    utility_rank: int = 0
    #: the training framework the cost model predicts for ("torch" or "ort")
    backend: str = "torch"
    #: held-out tokens a device evaluates per round (forward passes): part of its round time
    eval_tokens: int = 0
    #: bytes of the global adapter a device downloads before it trains
    download_bytes: float = 0.0
    #: what a device's update may travel as (the fleet's precision, or every one it reads)
    precisions: tuple[str, ...] = ("fp32",)

    def __post_init__(self) -> None:
        if self.deadline_s <= 0:
            raise ValueError(f"PlanOptions.deadline_s must be > 0, got {self.deadline_s}")
        if not 0 < self.memory_margin <= 1 or not 0 < self.time_margin <= 1:
            raise ValueError("PlanOptions.memory_margin and time_margin must be in (0, 1]")
        unknown = set(self.quantizations) - set(QUANTIZATIONS)
        if unknown:
            raise ValueError(f"PlanOptions.quantizations has unknown {sorted(unknown)}")
        if not self.precisions or set(self.precisions) - set(DELTA_PRECISIONS):
            raise ValueError(f"PlanOptions.precisions must be among {', '.join(DELTA_PRECISIONS)}, got {self.precisions}")
        if self.backend not in ("torch", "ort"):
            raise ValueError(f"PlanOptions.backend must be 'torch' or 'ort', got {self.backend!r}")


@dataclass(frozen=True)
class Candidate:
    config: Config
    local_steps: int
    memory_bytes: float
    step_s: float
    upload_bytes: float
    utility: float

    @property
    def tokens(self) -> int:
        return self.local_steps * self.config.batch_size * self.config.seq_len

    def plan(self) -> DevicePlan:
        return self.config.plan(self.local_steps)


@dataclass
class FleetPlan:
    chosen: dict[str, Candidate] = field(default_factory=dict)
    #: device -> why it cannot take part
    excluded: dict[str, str] = field(default_factory=dict)
    method: str = "enumeration"

    @property
    def utility(self) -> float:
        return sum(c.utility for c in self.chosen.values())

    @property
    def tokens(self) -> int:
        return sum(c.tokens for c in self.chosen.values())

    def plans(self) -> dict[str, DevicePlan]:
        return {device: c.plan() for device, c in self.chosen.items()}


def candidates(arch: Arch, profile: DeviceProfile, options: PlanOptions, calibration: Calibration) -> tuple[list[Candidate], str]:
    """Every feasible configuration for one device, and why none is if the list is empty."""
    # bfloat16 needs a measured bf16 throughput: without bf16 instructions it is emulated, slowly
    allowed = [q for q in options.quantizations if q == "float32" or (
        q in profile.quantization and compute_dtype(q) in profile.gflops)]
    budget = profile.memory_bytes * options.memory_margin
    downlink = profile.downlink_mbps or profile.uplink_mbps
    download_s = options.download_bytes * 8 / (downlink * 1e6) if downlink else 0.0
    time_budget = options.deadline_s * options.time_margin - download_s
    feasible: list[Candidate] = []
    smallest_memory, fastest_step = math.inf, math.inf
    r_max = options.utility_rank or max(options.ranks)
    for rank, quantization, batch, checkpointing, precision in itertools.product(
        options.ranks, allowed, options.batch_sizes, options.checkpointing, options.precisions
    ):
        config = Config(rank, quantization, batch, options.seq_len, checkpointing, options.target_modules,
                        options.backend, precision)
        memory = estimate_memory(arch, config, calibration).total
        step = estimate_step_seconds(arch, config, profile, calibration)
        upload = wire_bytes(lora_parameters(arch, config), precision)
        upload_s = upload * 8 / (profile.uplink_mbps * 1e6) if profile.uplink_mbps else 0.0
        upload_s += estimate_eval_seconds(arch, config, profile, calibration, options.eval_tokens)
        smallest_memory = min(smallest_memory, memory)
        if memory > budget:
            continue
        steps = min(options.max_local_steps, math.floor((time_budget - upload_s) / step))
        fastest_step = min(fastest_step, step + upload_s)
        if steps < options.min_local_steps:
            continue
        utility = steps * batch * options.seq_len * (rank / r_max) ** options.rank_exponent
        feasible.append(Candidate(config, steps, memory, step, upload, utility))
    if feasible:
        return feasible, ""
    if smallest_memory > budget:
        return [], (f"needs at least {smallest_memory / 2**20:,.0f} MiB for the smallest configuration but may use "
                    f"{budget / 2**20:,.0f} MiB ({options.memory_margin:.0%} of {profile.memory_bytes / 2**20:,.0f} MiB)")
    return [], (f"{options.min_local_steps} step(s) take at least {_seconds(fastest_step * options.min_local_steps)}, "
                f"over the {_seconds(time_budget)} the deadline leaves")


def _seconds(value: float) -> str:
    """A duration for a reason: ``1,234 s``, or ``3.1e+12 s`` for one no device could wait out."""
    return f"{value:,.0f} s" if abs(value) < 1e7 else f"{value:.3g} s"


def plan_fleet(
    profiles: dict[str, DeviceProfile], arch: Arch, options: PlanOptions, calibration: Calibration | None = None,
    device_options: dict[str, PlanOptions] | None = None,
) -> FleetPlan:
    """``device_options`` replaces ``options`` for some devices (e.g. a torch-free device:
    float32 only, no checkpointing, ranks up to its artifacts')."""
    calibration = calibration or Calibration.load()
    plan = FleetPlan()
    options_by_device: dict[str, list[Candidate]] = {}
    for device, profile in sorted(profiles.items()):
        found, why = candidates(arch, profile, (device_options or {}).get(device, options), calibration)
        if found:
            options_by_device[device] = found
        else:
            plan.excluded[device] = why
    if options.uplink_budget_bytes is None:
        for device, found in options_by_device.items():
            plan.chosen[device] = best(found)
        return plan
    plan.method = "milp"
    plan.chosen, extra = _solve_with_budget(options_by_device, options.uplink_budget_bytes)
    plan.excluded.update(extra)
    return plan


def plan_uniform(
    profiles: dict[str, DeviceProfile], arch: Arch, options: PlanOptions, config: Config, steps: int,
    calibration: Calibration | None = None,
) -> FleetPlan:
    """One fixed configuration for every device (the fleet's own settings): a device whose
    memory it does not fit sits out; nothing is checked against the deadline, so a device too
    slow for it trains and misses the round. The one-size-fits-all baseline."""
    calibration = calibration or Calibration.load()
    plan = FleetPlan(method="uniform")
    memory = estimate_memory(arch, config, calibration).total
    for device, profile in sorted(profiles.items()):
        budget = profile.memory_bytes * options.memory_margin
        if memory > budget:
            plan.excluded[device] = (f"the fleet's configuration ({describe(config)}) needs {memory / 2**20:,.0f} MiB but "
                                     f"this device may use {budget / 2**20:,.0f} MiB")
            continue
        step = estimate_step_seconds(arch, config, profile, calibration)
        plan.chosen[device] = Candidate(config, steps, memory, step,
                                        wire_bytes(lora_parameters(arch, config), config.delta_precision),
                                        steps * config.batch_size * config.seq_len)
    return plan


def plan_weakest(
    profiles: dict[str, DeviceProfile], arch: Arch, options: PlanOptions, calibration: Calibration | None = None,
    device_options: dict[str, PlanOptions] | None = None,
) -> FleetPlan:
    """The best single configuration, steps included, that every device can run within its
    memory and the deadline: what a fleet configured by hand for its weakest member trains.
    Devices that fit no configuration at all sit out (as with the planner)."""
    calibration = calibration or Calibration.load()
    per_device: dict[str, dict[Config, Candidate]] = {}
    plan = FleetPlan(method="weakest")
    for device, profile in sorted(profiles.items()):
        found, why = candidates(arch, profile, (device_options or {}).get(device, options), calibration)
        if found:
            per_device[device] = {c.config: c for c in found}
        else:
            plan.excluded[device] = why
    if not per_device:
        return plan
    shared = set.intersection(*(set(found) for found in per_device.values()))
    if not shared:
        for device in per_device:
            plan.excluded[device] = "no single configuration fits every device"
        return plan
    r_max = options.utility_rank or max(options.ranks)

    def total(config: Config) -> tuple:
        steps = min(found[config].local_steps for found in per_device.values())
        utility = len(per_device) * steps * config.batch_size * config.seq_len * (config.rank / r_max) ** options.rank_exponent
        return utility, -max(found[config].step_s for found in per_device.values()), config.rank

    config = max(sorted(shared, key=describe), key=total)
    steps = min(found[config].local_steps for found in per_device.values())
    for device, found in per_device.items():
        c = found[config]
        plan.chosen[device] = dataclasses.replace(c, local_steps=steps, utility=c.utility * steps / c.local_steps)
    return plan


def describe(config: Config) -> str:
    """``r8, float32, batch 4[, checkpointing][, int8 update]``."""
    ckpt = ", checkpointing" if config.gradient_checkpointing else ""
    update = f", {config.delta_precision} update" if config.delta_precision != "fp32" else ""
    return f"r{config.rank}, {config.quantization}, batch {config.batch_size}{ckpt}{update}"


def for_capabilities(options: PlanOptions, capabilities: Capabilities) -> PlanOptions:
    """``options`` narrowed to what a device can do: the update precisions it writes; a
    torch-free (ONNX Runtime) device trains a float32 base without checkpointing at ranks up to
    its artifacts'."""
    precisions = tuple(p for p in options.precisions if p in capabilities.precisions)
    if precisions != options.precisions:
        options = dataclasses.replace(options, precisions=precisions or ("fp32",))
    if not capabilities.torch_free:
        return options
    ranks = tuple(r for r in options.ranks if not capabilities.max_rank or r <= capabilities.max_rank)
    if not ranks:  # the artifacts' rank is below every candidate: plan that rank
        ranks = (capabilities.max_rank,)
    return dataclasses.replace(options, quantizations=("float32",), checkpointing=(False,),
                               ranks=ranks, utility_rank=max(options.ranks), backend="ort")


def ranks_up_to(max_rank: int) -> tuple[int, ...]:
    """Candidate ranks for a fleet whose global adapter has ``max_rank``: powers of two up to
    it, and ``max_rank`` itself."""
    ranks, r = {max_rank}, 1
    while r < max_rank:
        ranks.add(r)
        r *= 2
    return tuple(sorted(x for x in ranks if x >= min(2, max_rank)))


def best(found: list[Candidate]) -> Candidate:
    """Highest utility; ties go to the more precise update (quantize only where it buys
    training), then to the faster step (the round ends sooner), then to less memory."""
    return max(found, key=lambda c: (c.utility, -DELTA_PRECISIONS.index(c.config.delta_precision), -c.step_s,
                                     -c.memory_bytes, c.config.rank))


def _solve_with_budget(options_by_device: dict[str, list[Candidate]], budget: float):
    """The knapsack form: one binary per (device, rank, precision): for those, the upload size
    is fixed, so only each device's best candidate of the pair can be in an optimal plan."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    variables: list[tuple[str, Candidate]] = []
    for device, found in options_by_device.items():
        by_rank: dict[tuple[int, str], list[Candidate]] = {}
        for c in found:
            by_rank.setdefault((c.config.rank, c.config.delta_precision), []).append(c)
        variables += [(device, best(group)) for group in by_rank.values()]
    if not variables:
        return {}, {}
    devices = sorted(options_by_device)
    utility = np.array([c.utility for _, c in variables])
    one_each = np.array([[1.0 if d == device else 0.0 for d, _ in variables] for device in devices])
    uplink = np.array([[c.upload_bytes for _, c in variables]])
    result = milp(
        c=-utility,
        constraints=[LinearConstraint(one_each, 0, 1), LinearConstraint(uplink, 0, budget)],
        integrality=np.ones(len(variables)),
        bounds=Bounds(0, 1),
    )
    if not result.success:
        raise RuntimeError(f"planner MILP failed: {result.message}")
    chosen = {d: c for (d, c), x in zip(variables, result.x) if x > 0.5}
    left_out = {d: f"left out to keep the fleet's updates within the uplink budget of {budget / 1e6:,.1f} MB per round"
                for d in devices if d not in chosen}
    return chosen, left_out
