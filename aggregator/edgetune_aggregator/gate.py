"""The validation gate: whether a new global version may be served, judged on what devices
measured of it next to the version they serve (docs/operations.md). Pure functions.

In the round that trains on a new version every device scores it on its held-out blocks before
training (``TrainMetrics.global_ppl``), and scores the version it serves on the same blocks
(``serving_ppl``): paired scores, so the comparison is the versions', not the blocks'. The
final evaluation round does the same for the last version. The candidate fails if the fleet's
perplexity (weighted by samples, over the devices that reported both) rose by more than
``max_regression``, or any device's by more than its own threshold. A version the fleet
cannot judge (no device reported both: evaluation is off, or no version is served yet) is not
failed: the verdict says so, and automatic promotion serves it as it would without a gate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class GateSettings:
    #: the most the fleet's perplexity may rise over the serving version's (0.05: 5 %);
    #: None: no overall check
    max_regression: float | None = 0.05
    #: the most any one device's may rise (None: not checked per device) ...
    max_device_regression: float | None = None
    #: ... or, for the devices named here, their own threshold
    device_thresholds: dict[str, float] = field(default_factory=dict)
    #: devices that must have reported both scores for a verdict
    min_reports: int = 1
    #: text the aggregator itself scores each new version on (.txt or .jsonl; None: devices only),
    #: with the fleet's base model loaded here (needs PyTorch: ``validation_text.py``)
    validation_text: Path | None = None
    #: that model (a GGUF file, a model folder, tiny-llama; None: the default SmolLM2 GGUF)
    validation_model: str | None = None
    #: blocks of ``validation_seq_len`` tokens of the text scored
    validation_blocks: int = 32
    validation_seq_len: int = 128

    def __post_init__(self) -> None:
        for name, value in (("max_regression", self.max_regression),
                            ("max_device_regression", self.max_device_regression),
                            *((f"device_thresholds.{d}", t) for d, t in self.device_thresholds.items())):
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"gate {name} must be a fraction ≥ 0 (0.05: 5 %) or none, got {value!r}")
        if not isinstance(self.min_reports, int) or self.min_reports < 1:
            raise ValueError(f"gate min_reports must be an integer ≥ 1, got {self.min_reports!r}")
        if self.validation_blocks < 1 or self.validation_seq_len < 2:
            raise ValueError("gate validation_blocks must be ≥ 1 and validation_seq_len ≥ 2")

    @property
    def enabled(self) -> bool:
        return (self.max_regression is not None or self.max_device_regression is not None
                or bool(self.device_thresholds))


@dataclass(frozen=True)
class Score:
    """One device's paired scores: the candidate's and the serving version's perplexity."""

    device_id: str
    samples: int
    candidate: float
    serving: float


@dataclass(frozen=True)
class Verdict:
    candidate: int
    serving: int
    #: True: may be served; False: a regression (``reason``); None: not judged (no scores)
    passed: bool | None
    reason: str
    #: the fleet's perplexity of each version over the reporting devices (None: no scores)
    candidate_ppl: float | None = None
    serving_ppl: float | None = None
    reports: int = 0
    #: each device's relative change (+0.1: 10 % worse)
    devices: dict[str, float] = field(default_factory=dict)
    #: the aggregator's own scores on its validation text: (candidate, serving) perplexity
    server: tuple[float, float] | None = None

    def as_dict(self) -> dict:
        return {"candidate": self.candidate, "serving": self.serving, "passed": self.passed, "reason": self.reason,
                "candidate_ppl": self.candidate_ppl, "serving_ppl": self.serving_ppl, "reports": self.reports,
                "devices": dict(self.devices), "server": list(self.server) if self.server else None}


def judge(candidate: int, serving: int, scores: Iterable[Score], settings: GateSettings,
          server: tuple[float, float] | None = None) -> Verdict:
    """Whether ``candidate`` may replace ``serving``, from the devices' paired ``scores`` and
    the aggregator's own ``server`` scores on its validation text (candidate, serving), if any:
    each must stay within ``max_regression``."""
    rows = [s for s in scores if s.samples > 0 and _finite(s.candidate) and _finite(s.serving) and s.serving > 0]
    server = server if server is not None and all(_finite(v) and v > 0 for v in server) else None
    if server is not None:
        change = server[0] / server[1] - 1.0
        if settings.max_regression is not None and change > settings.max_regression:
            return Verdict(candidate, serving, False, f"on the aggregator's validation text the perplexity rose "
                           f"{change:+.1%} ({server[1]:.3f} → {server[0]:.3f}), more than {settings.max_regression:.1%}",
                           reports=len(rows), server=server)
        if len(rows) < settings.min_reports:
            return Verdict(candidate, serving, True, f"on the aggregator's validation text {change:+.1%} "
                           f"({server[1]:.3f} → {server[0]:.3f}); {len(rows)} device(s) scored both", reports=len(rows),
                           server=server)
    if len(rows) < settings.min_reports:
        return Verdict(candidate, serving, None, f"{len(rows)} device(s) scored both versions, the gate needs "
                       f"{settings.min_reports}", reports=len(rows))
    total = sum(s.samples for s in rows)
    fleet_candidate = sum(s.candidate * s.samples for s in rows) / total
    fleet_serving = sum(s.serving * s.samples for s in rows) / total
    changes = {s.device_id: s.candidate / s.serving - 1.0 for s in rows}
    overall = fleet_candidate / fleet_serving - 1.0
    problems = []
    if settings.max_regression is not None and overall > settings.max_regression:
        problems.append(f"the fleet's perplexity rose {overall:+.1%} ({fleet_serving:.3f} → {fleet_candidate:.3f}), "
                        f"more than {settings.max_regression:.1%}")
    for device, change in sorted(changes.items(), key=lambda kv: -kv[1]):
        limit = _limit(device, settings.device_thresholds, settings.max_device_regression)
        if limit is not None and change > limit:
            problems.append(f"{device}'s rose {change:+.1%}, more than its {limit:.1%}")
    reason = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
    return Verdict(candidate, serving, not problems,
                   reason or f"the fleet's perplexity {overall:+.1%} ({fleet_serving:.3f} → {fleet_candidate:.3f})",
                   fleet_candidate, fleet_serving, len(rows), changes, server)


def _limit(device: str, thresholds: Mapping[str, float], default: float | None) -> float | None:
    return thresholds.get(device, default)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
