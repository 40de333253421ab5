"""Staged rollout (docs/operations.md): a promoted version is served by a few canary devices
first; the rest follow once the canaries' reports pass, and the canaries go back if they fail.
Pure functions: which devices are canaries, and what their reports say.

Canaries are chosen reproducibly: among the devices whose labels match ``canary_labels``, the
``canary_fraction`` (at least one) whose SHA-256 of (run, version, device id) sorts first. The
same version in the same run gets the same canaries after a restart; another version, others,
so no device carries every first try. A canary reports both versions' perplexity on its
held-out text; the rollout fails if any canary did not switch, did not report in time, or saw
its perplexity rise by more than ``max_canary_regression``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from .gate import GateSettings, Score, Verdict, judge


#: the most canaries one stage names (the retained notice lists them and must fit one packet)
MAX_CANARIES = 10_000


@dataclass(frozen=True)
class RolloutSettings:
    #: the share of devices that serve a new version first (0: every device at once)
    canary_fraction: float = 0.0
    #: only devices with all these labels may be canaries (``{site = "plant-3"}``); empty: any
    canary_labels: dict[str, str] = field(default_factory=dict)
    #: the most any canary's held-out perplexity may rise over the version it served before
    max_canary_regression: float | None = 0.05
    #: how long the canaries have to report before the rollout fails
    canary_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if not (isinstance(self.canary_fraction, (int, float)) and 0 <= self.canary_fraction < 1):
            raise ValueError(f"rollout canary_fraction must be in [0, 1) (0: no canary stage), got "
                             f"{self.canary_fraction!r}")
        if self.max_canary_regression is not None and not (math.isfinite(self.max_canary_regression)
                                                           and self.max_canary_regression >= 0):
            raise ValueError(f"rollout max_canary_regression must be ≥ 0 or none, got {self.max_canary_regression!r}")
        if not (math.isfinite(self.canary_timeout_s) and self.canary_timeout_s > 0):
            raise ValueError(f"rollout canary_timeout_s must be > 0, got {self.canary_timeout_s!r}")


def choose_canaries(devices: Mapping[str, Mapping[str, str]], settings: RolloutSettings, run_id: str,
                    version: int) -> list[str]:
    """The canaries for ``version`` among ``devices`` (id -> labels: those that serve versions
    and report on them), sorted; [] for none."""
    if settings.canary_fraction <= 0:
        return []
    eligible = [d for d, labels in devices.items()
                if all(labels.get(k) == v for k, v in settings.canary_labels.items())]
    if len(eligible) < 2 and not settings.canary_labels:
        return []  # (a fleet of one has no one to spare the first try)
    count = min(len(eligible), max(1, math.ceil(settings.canary_fraction * len(devices))), MAX_CANARIES)
    ranked = sorted(eligible, key=lambda d: hashlib.sha256(f"{run_id}/{version}/{d}".encode()).hexdigest())
    return sorted(ranked[:count])


def canary_verdict(candidate: int, serving: int, canaries: list[str], reports: Mapping[str, Mapping],
                   samples: Mapping[str, int], settings: RolloutSettings, timed_out: bool) -> Verdict | None:
    """The rollout's verdict from the canaries' latest reports (``ServingReport`` as dicts), or
    None while some have yet to report and time remains."""
    mine = {d: r for d, r in reports.items() if d in canaries and r.get("version") == candidate}
    missing = [d for d in canaries if d not in mine]
    if missing and not timed_out:
        return None
    refused = {d: r.get("reason", "") for d, r in mine.items() if not r.get("switched")}
    if missing or refused:
        what = [f"{', '.join(missing)} did not report in {settings.canary_timeout_s:.0f} s"] if missing else []
        what += [f"{d} did not switch ({reason})" for d, reason in sorted(refused.items())]
        return Verdict(candidate, serving, False, "; ".join(what)[:1000], reports=len(mine))
    # (a canary that scored nothing, such as a light simulated device or one whose scoring failed
    # (its reason says so), counts as switched, not as measured; if none measured, switching decides)
    scores = [Score(d, max(1, samples.get(d, 1)), r.get("ppl"), r.get("previous_ppl")) for d, r in mine.items()
              if r.get("previous") == serving]
    verdict = judge(candidate, serving, scores,
                    GateSettings(max_regression=None, max_device_regression=settings.max_canary_regression))
    if verdict.passed is None:  # (switched, and nothing measured says no: light devices, evaluation off)
        return Verdict(candidate, serving, True, f"{len(mine)} canaries serve it; none scored it", reports=len(mine))
    return verdict
