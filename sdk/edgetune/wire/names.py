"""Names and numbers every wire dataclass checks (defined in ``edgetune.checks``, which the
adapter kinds' specs use too without importing the wire)."""

from __future__ import annotations

from ..checks import check_labels, check_name, check_positive

__all__ = ["check_labels", "check_name", "check_positive"]
