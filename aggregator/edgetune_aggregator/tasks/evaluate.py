"""Evaluation rounds: every device scores the final global adapter on its held-out data (and
the other sites', where it has them); the round log keeps the scores."""

from __future__ import annotations

from edgetune.wire import EvalReport, TaskKind

from ..store import DeviceRecord, RoundStatus
from .base import RoundContext, TaskHandler, score


class EvaluateHandler(TaskHandler):
    kind = TaskKind.EVALUATE

    def accept(self, ctx: RoundContext, report: EvalReport, norm: float | None) -> None:
        sender = report.device_id
        ctx.seen.add(sender)
        ctx.record.devices.append(DeviceRecord(sender, report.num_samples,
                                               global_ppl=score(report.metrics.global_ppl, sender),
                                               global_robust_ppl=score(report.metrics.robust_ppl, sender),
                                               serving_version=report.metrics.serving_version,
                                               serving_ppl=score(report.metrics.serving_ppl, sender)))

    def close(self, ctx: RoundContext, enough: bool) -> None:
        if ctx.record.devices:
            ctx.record.status = RoundStatus.EVALUATED
