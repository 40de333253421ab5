"""Calibration rounds: devices score every candidate weight matrix on their data (sensitivity,
docs/importance.md); at the close the scores are combined, sample-weighted, and the matrices
that carry adapters are chosen within the adapter budget (``edgetune.planning.layout``)."""

from __future__ import annotations

import logging
import math
from collections import Counter

from edgetune.adapters.lora import targets
from edgetune.planning.layout import adapter_cost, combine_scores, select_layout
from edgetune.wire import ImportanceReport, TaskKind

from ..config import AggregatorConfig
from ..fleet import Fleet
from ..store import DeviceRecord, RoundStatus
from ..validation import Refusal
from .base import RoundContext, TaskHandler

log = logging.getLogger("edgetune_aggregator.daemon")


class CalibrateHandler(TaskHandler):
    kind = TaskKind.CALIBRATE

    def __init__(self, config: AggregatorConfig, fleet: Fleet):
        self.config = config
        self.fleet = fleet
        self._reports: list[ImportanceReport] = []

    def begin(self, ctx: RoundContext) -> None:
        self._reports = []

    def check(self, report: ImportanceReport, ctx: RoundContext | None) -> Refusal | None:
        # (the candidates are the calibration task's targets: the fleet's adapter while it calibrates)
        unknown = report.scores.keys() - set(targets(self.fleet.state.adapter, self.fleet.state.model.modules))
        if unknown:
            return Refusal("bad_scores", f"scores for {len(unknown)} unknown matrices, e.g. {sorted(unknown)[:2]}")
        if not report.scores:
            return Refusal("bad_scores", "no scores")
        if not all(math.isfinite(v) and v >= 0 for v in report.scores.values()):
            return Refusal("bad_scores", "scores must be finite and ≥ 0")
        return None

    def accept(self, ctx: RoundContext, report: ImportanceReport, norm: float | None) -> None:
        ctx.seen.add(report.device_id)
        self._reports.append(report)
        ctx.record.devices.append(DeviceRecord(report.device_id, report.num_samples, train_tokens=report.tokens,
                                               train_seconds=report.seconds))
        log.info("round %d: importance scores from %s (%d matrices)", ctx.number, report.device_id, len(report.scores))

    def close(self, ctx: RoundContext, enough: bool) -> None:
        if not enough:
            return
        try:
            ctx.record.layout = list(self._choose_layout(ctx))
            ctx.record.status = RoundStatus.CALIBRATED
        except ValueError as exc:
            ctx.record.status, ctx.record.note = RoundStatus.FAILED, f"no layout: {exc}"

    def _choose_layout(self, ctx: RoundContext) -> tuple[str, ...]:
        """Combine the devices' scores (sample-weighted) and select matrices within the budget."""
        spec, modules = self.config.adapter, self.fleet.state.model.modules
        budget = self.config.adapter_budget or adapter_cost(modules, targets(spec, modules), spec.rank)
        scores = combine_scores([(report.scores, report.num_samples) for report in self._reports])
        layout = select_layout(scores, {m: modules[m] for m in scores}, spec.rank, budget)
        kinds = Counter(name.rsplit(".", 1)[-1] for name in layout.modules)
        ctx.record.note = (f"importance layout: {len(layout.modules)} matrices ({dict(sorted(kinds.items()))}), "
                           f"{layout.cost:,} of {budget:,} adapter parameters, {layout.score_covered:.0%} of the score")
        log.info("round %d: %s", ctx.number, ctx.record.note)
        return layout.modules
