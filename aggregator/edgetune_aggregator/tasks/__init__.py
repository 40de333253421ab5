"""One handler per task kind (``TaskHandler``, ``base.py``): what a result of that kind must
contain, how it is recorded in its round, and what the round's close decides. The round loop
and the result desk find the handler through ``edgetune.wire.TASKS`` (which result answers
which task): nothing else in the daemon switches on the kind of a task or a message."""

from .base import RoundContext, TaskHandler
from .calibrate import CalibrateHandler
from .evaluate import EvaluateHandler
from .initialize import InitializeHandler
from .train import TrainHandler

__all__ = ["CalibrateHandler", "EvaluateHandler", "InitializeHandler", "RoundContext", "TaskHandler", "TrainHandler"]
