"""Making each round's task: the fleet's training settings, and for each device that sent a
profile the configuration the planner picks (rank, base precision, batch, steps) or why it
sits out. A device that joins an open train round gets its plan added to the published task.

Planning is an optimisation: when it fails the round goes on with the fleet's defaults, and
/healthz says so (``Health.problem("planning", …)``).
"""

from __future__ import annotations

import dataclasses
import logging

from edgetune.adapters.lora import targets
from edgetune.wire import RoundTask, TaskKind

from .config import AggregatorConfig
from .fleet import Fleet
from .health import Health
from .membership import Membership
from .publisher import Publisher
from .strategies import ExactStrategy

log = logging.getLogger("edgetune_aggregator.daemon")


class TaskMaker:
    def __init__(self, config: AggregatorConfig, fleet: Fleet, members: Membership, publisher: Publisher,
                 health: Health):
        self.config = config
        self.fleet = fleet
        self.members = members
        self.publisher = publisher
        self.health = health
        self._calibration = None  # the cost model's coefficients, read once when first needed
        self._predicted: dict[str, dict] = {}  # the last plan's predicted peak memory and step time

    def publish(self, round_number: int, kind: TaskKind) -> RoundTask:
        task = self.make(round_number, kind)
        self.publisher.publish_task(task)
        return task

    def recorded_plans(self, task: RoundTask) -> dict[str, dict]:
        """The task's plans as the round log keeps them: with the cost model's predictions."""
        return {d: dataclasses.asdict(p) | self._predicted.get(d, {}) for d, p in task.plans.items()}

    def plan_latecomer(self, device: str) -> tuple[dict | None, str | None] | None:
        """A device with a profile joined an open train round: add its plan (or exclusion) to
        the published task and return it as ``(plan for the round log, exclusion)``; None if
        nothing changed. Plans already handed out stay as they are (devices may be training on them)."""
        task = self.publisher.task
        if task is None or task.kind is not TaskKind.TRAIN or device in task.plans or device in task.excluded:
            return None
        try:
            plans, excluded = self.plan(task.kind, only=device)
        except Exception:
            log.exception("planning for %s failed; it trains with the fleet's defaults", device)
            return None
        if device not in plans and device not in excluded:
            return None
        added_plans = {**task.plans, **({device: plans[device]} if device in plans else {})}
        added_excluded = {**task.excluded, **({device: excluded[device]} if device in excluded else {})}
        self.publisher.publish_task(dataclasses.replace(task, plans=added_plans, excluded=added_excluded))
        if device in plans:
            return dataclasses.asdict(plans[device]) | self._predicted.get(device, {}), None
        return None, excluded[device]

    def plan(self, kind: TaskKind, only: str | None = None) -> tuple[dict, dict]:
        """Per-device plans and exclusions for the devices that sent a profile (``only``: for
        that one device, when devices are independent of each other). ``config.plan`` says
        how: each device's best configuration (auto), the best one every device can run
        (weakest), or the fleet's own settings where they fit in memory (uniform)."""
        self._predicted = {}
        profiles = {d: h.profile for d, h in self.members.devices.items() if h.profile is not None}
        if not (self.config.planning and profiles) or kind in (TaskKind.FINISHED, TaskKind.INITIALIZE):
            return {}, {}
        if not self.fleet.kind.plannable:  # the cost model knows LoRA only (docs/planner.md)
            return {}, {}
        if self.config.train.algorithm == "fedsgd":  # one gradient at the full rank: nothing to plan
            return {}, {}
        from edgetune.planning.profile_check import profile_problem

        # an impossible profile (NaN, zero, beyond any hardware) excludes its device, not the fleet
        unusable = {d: f"its profile is unusable: {why}" for d, p in profiles.items() if (why := profile_problem(p))}
        profiles = {d: p for d, p in profiles.items() if d not in unusable}
        if only is not None and only in unusable:
            return {}, {only: unusable[only]}
        if not profiles:
            return {}, unusable
        from edgetune.planning.costmodel import Arch, Calibration, Config
        from edgetune.planning.planner import (
            PlanOptions,
            for_capabilities,
            plan_fleet,
            plan_uniform,
            plan_weakest,
            ranks_up_to,
        )

        independent = self.config.uplink_budget_mb is None and self.config.plan in ("auto", "uniform")
        if only is not None and independent:
            # Without a fleet-wide budget each device's optimum is its own: plan just this one.
            profiles = {only: profiles[only]}
        if self._calibration is None:
            self._calibration = Calibration.load()

        try:
            arch = Arch.from_manifest(self.fleet.state.model)
        except ValueError as exc:
            log.warning("not planning: %s", exc)
            return {}, {}
        spec, train = self.fleet.state.adapter, self.config.train
        # what a device evaluates each round: its own held-out blocks before and after training,
        # and as often the robustness set (the planner counts the worst case)
        eval_tokens = 4 * train.eval_blocks * train.seq_len if kind is TaskKind.TRAIN else 0
        options = PlanOptions(
            deadline_s=self.config.round_timeout_s,
            seq_len=train.seq_len,
            ranks=ranks_up_to(spec.rank),
            target_modules=spec.target_modules,
            max_local_steps=train.local_steps,
            uplink_budget_bytes=self.config.uplink_budget_mb * 1e6 if self.config.uplink_budget_mb else None,
            eval_tokens=eval_tokens,
            download_bytes=float(self.publisher.global_bytes),
            precisions=self.config.update_precisions,
        )
        narrowed = {d: for_capabilities(options, self.members.devices[d].capabilities) for d in profiles}
        device_options = {d: o for d, o in narrowed.items() if o is not options}
        if self.config.plan == "uniform":
            config = Config(spec.rank, "float32", train.batch_size, train.seq_len, False, spec.target_modules,
                            delta_precision=self.config.downlink_precision)
            plan = plan_uniform(profiles, arch, options, config, train.local_steps, self._calibration)
        elif self.config.plan == "weakest":
            plan = plan_weakest(profiles, arch, options, self._calibration, device_options)
        else:
            plan = plan_fleet(profiles, arch, options, self._calibration, device_options)
        excluded = {**plan.excluded, **unusable}
        for device, reason in excluded.items():
            log.warning("planner leaves %s out: %s", device, reason)
        for device, choice in plan.chosen.items():
            c = choice.config
            self._predicted[device] = {"predicted_peak_bytes": int(choice.memory_bytes),
                                       "predicted_step_s": round(choice.step_s, 4)}
            log.info("plan for %s: rank %d, %s base, batch %d%s, %d steps, %s update (predicted %.0f MiB, %.1f s/step)",
                     device, c.rank, c.quantization, c.batch_size, ", checkpointing" if c.gradient_checkpointing else "",
                     choice.local_steps, c.delta_precision, choice.memory_bytes / 2**20, choice.step_s)
        return plan.plans(), excluded

    def make(self, round_number: int, kind: TaskKind, sit_out: dict[str, str] | None = None) -> RoundTask:
        train = dataclasses.replace(self.config.train, seed=self.config.train.seed + round_number)
        try:
            plans, excluded = self.plan(kind)
            self.health.problem("planning", None)
        except Exception as exc:  # planning is an optimisation: without it, devices use the defaults
            log.exception("planning round %d failed; devices train with the fleet's defaults", round_number)
            self.health.problem("planning", f"round {round_number}: {type(exc).__name__}: {exc}")
            plans, excluded = {}, {}
        if self.fleet.state.left_out:  # another base: their updates would be dropped anyway
            excluded = {**excluded, **{d: f"computed another starting adapter ({why})"
                                       for d, why in self.fleet.state.left_out.items()}}
        if sit_out:
            excluded = {**excluded, **sit_out}
        if kind is TaskKind.CALIBRATE:  # scoring needs weight gradients, which only PyTorch computes
            excluded = {**excluded, **{d: "trains with ONNX Runtime, which cannot score weight importance"
                                       for d, h in self.members.devices.items() if h.capabilities.torch_free}}
            excluded = {**excluded, **{d: why for d, why in self._scoring_misfits(plans).items() if d not in excluded}}
            plans = {d: p for d, p in plans.items() if d not in excluded}
        task = RoundTask(
            round=round_number,
            kind=kind,
            global_version=self.fleet.state.global_version,
            model_fingerprint=self.fleet.state.model.fingerprint,
            adapter=self.fleet.state.adapter,
            train=train,
            deadline_s=self.config.round_timeout_s,
            plans=plans,
            excluded=excluded,
            run_id=self.fleet.state.run_id,
            importance=self.config.importance,
            max_staleness=self.config.max_staleness,
            delta_precision=self.config.downlink_precision,
            error_feedback=not isinstance(self.fleet.strategy, ExactStrategy),
            whole_updates=self.config.workers,
        )
        return task

    def _scoring_misfits(self, plans: dict) -> dict[str, str]:
        """Devices whose memory cannot hold importance scoring (a state for every candidate
        weight), and why: they sit the calibration round out rather than run out of memory."""
        from edgetune.planning.costmodel import Arch, Calibration, estimate_scoring_memory

        try:
            arch = Arch.from_manifest(self.fleet.state.model)
        except ValueError:
            return {}
        if self._calibration is None:
            self._calibration = Calibration.load()
        modules = self.fleet.state.model.modules
        candidates = sum(modules[m][0] * modules[m][1] for m in targets(self.fleet.state.adapter, modules))
        out = {}
        for device, hello in self.members.devices.items():
            if hello.profile is None:
                continue
            batch = min(plans[device].batch_size if device in plans else self.config.train.batch_size,
                        self.config.importance.batch_size)
            need = estimate_scoring_memory(arch, candidates, batch, self.config.train.seq_len, self._calibration)
            allowed = hello.profile.memory_bytes * 0.85
            if need > allowed:
                out[device] = (f"importance scoring needs about {need / 2**20:,.0f} MiB (moving averages for "
                               f"{candidates:,} candidate weights) but this device may use {allowed / 2**20:,.0f} MiB")
        return out
