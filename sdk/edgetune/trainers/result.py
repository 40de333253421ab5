"""What one round of local training reports, whatever the framework."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TrainResult"]


@dataclass(frozen=True)
class TrainResult:
    """One round of local training. ``mean_loss`` averages the optimizer steps' losses (each
    the mean over its micro-batches); ``tokens`` counts input tokens seen. Losses are the data
    loss only, without a FedProx term, so they compare across rounds and settings."""

    mean_loss: float
    final_loss: float
    tokens: int
    seconds: float
    steps: int
