"""What each kind of round task asks of a device, and what answers it: the table both sides
read. A device looks up whether it must hold the task's global adapter before it acts and
which message (on which topic kind) carries its answer; the aggregator looks up which task a
result answers and whether it journals it. A new task kind is one row here, a device step
(``edgetune.protocol``) and an aggregator handler (``edgetune_aggregator.tasks``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .messages import AdapterInit, EvalReport, ImportanceReport, TaskKind, Update

__all__ = ["TASKS", "TASK_OF_RESULT", "TaskSpec"]


@dataclass(frozen=True)
class TaskSpec:
    kind: TaskKind
    #: the message a device answers with (None: none, the fleet is over)
    result: type | None
    #: the topic kind (``kinds.py``) the answer travels on
    topic: str | None
    #: a device acts once it holds the task's global adapter (calibration and initialization
    #: come before the fleet has one)
    needs_global: bool
    #: the aggregator writes accepted answers to the round journal before acknowledging them
    #: (rounds before the fleet's first saved state are started afresh instead)
    journaled: bool


TASKS: dict[TaskKind, TaskSpec] = {spec.kind: spec for spec in (
    TaskSpec(TaskKind.CALIBRATE, ImportanceReport, "importance", needs_global=False, journaled=False),
    TaskSpec(TaskKind.INITIALIZE, AdapterInit, "init", needs_global=False, journaled=False),
    TaskSpec(TaskKind.TRAIN, Update, "update", needs_global=True, journaled=True),
    TaskSpec(TaskKind.EVALUATE, EvalReport, "eval", needs_global=True, journaled=True),
    TaskSpec(TaskKind.FINISHED, None, None, needs_global=False, journaled=False),
)}
#: result message class -> the task kind it answers
TASK_OF_RESULT: dict[type, TaskKind] = {spec.result: kind for kind, spec in TASKS.items() if spec.result is not None}
