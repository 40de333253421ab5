"""Devices' personalization reports (docs/personalization.md), recorded whenever they come:
devices personalize on their own schedule, during the fleet's rounds or after it finished.
Each is stored as sent in ``personalization.json``, so its free-form parts are bounded here."""

from __future__ import annotations

import dataclasses
import logging
import math
import time

from edgetune.transport.channel import Channel
from edgetune.wire import PersonalizationReport

from .fleet import Fleet
from .membership import Membership

log = logging.getLogger("edgetune_aggregator.daemon")


class PersonalizationLog:
    def __init__(self, fleet: Fleet, members: Membership, channel: Channel):
        self.fleet = fleet
        self.members = members
        self.channel = channel

    def record(self, topic: str, report: PersonalizationReport) -> None:
        """Record a device's personalization scores (any time: devices personalize on their own
        schedule) in ``personalization.json``."""
        if report.device_id not in self.members.devices:
            return self.channel.drop(report.device_id, topic, "unknown_device", "no hello received from it")
        if self.fleet.state and report.device_id in self.fleet.state.left_out:
            return self.channel.drop(report.device_id, topic, "init_mismatch", "left out of this fleet")
        values = [report.global_ppl, report.local_ppl, report.personal_ppl, report.global_robust_ppl,
                  report.local_robust_ppl, report.personal_robust_ppl, *report.validation.values()]
        if not all(v is None or (math.isfinite(v) and v > 0) for v in values):
            return self.channel.drop(report.device_id, topic, "bad_scores", "perplexities must be finite and > 0")
        why = _check_report(report)
        if why:
            return self.channel.drop(report.device_id, topic, "bad_field", why)
        entry = dataclasses.asdict(report) | {"received_at": time.time()}
        try:
            self.fleet.store.append_personalization(entry)
        except (OSError, ValueError) as exc:  # (a damaged file) the rounds go on; this report is lost and says so
            log.error("could not record %s's personalization report: %s", report.device_id, exc)
            return None
        robust = (f", others' {report.global_robust_ppl:.2f} -> {report.personal_robust_ppl:.2f}"
                  if report.global_robust_ppl is not None and report.personal_robust_ppl is not None else "")
        log.info("device %s personalized global v%d with α=%.2f: own held-out ppl %.2f -> %.2f%s", report.device_id,
                 report.global_version, report.alpha, report.global_ppl, report.personal_ppl, robust)
        return None


def _check_report(report: PersonalizationReport) -> str | None:
    """Why a personalization report is not worth keeping (None if it is): it is stored as
    sent, so its free-form parts are bounded here."""
    for key in report.validation:
        if len(key) > 16:
            return f"validation key {key[:20]!r}… is not an α"
        try:
            alpha = float(key)
        except ValueError:
            return f"validation key {key[:20]!r} is not an α"
        if not 0.0 <= alpha <= 1.0:
            return f"validation α {alpha} is outside [0, 1]"
    if any(len(k) > 64 or len(v) > 64 for k, v in report.settings.items()):
        return "settings entries are limited to 64 characters"
    if not (math.isfinite(report.train_seconds) and report.train_seconds >= 0) or report.global_version < 0:
        return "train_seconds and global_version must be ≥ 0"
    return None
