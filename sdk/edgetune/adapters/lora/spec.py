"""The LoRA spec: which linear layers get low-rank factors, their rank and scale. It travels in
every task (``edgetune.wire`` re-exports it), so it imports nothing of the wire."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ...checks import check_positive

__all__ = ["LoraSpec"]


@dataclass(frozen=True)
class LoraSpec:
    """Which linear layers get LoRA factors, and their rank.

    A module named ``m`` gets ``m.lora_A`` of shape (rank, in) and ``m.lora_B`` of shape
    (out, rank); the update it makes to the frozen weight is ``(alpha / rank) · B @ A``.
    ``target_modules`` match the last component(s) of a module name, as in PEFT.
    """

    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    dropout: float = 0.0
    #: the adapter kind on the wire (``AdapterSpec`` is a union told apart by it)
    kind: str = "lora"

    def __post_init__(self) -> None:
        if self.kind != "lora":
            raise ValueError(f"LoraSpec.kind must be 'lora', got {self.kind!r}")
        if not 1 <= self.rank <= 1024:
            raise ValueError(f"LoraSpec.rank must be in 1..1024, got {self.rank}")
        check_positive(self.alpha, "LoraSpec.alpha")
        if not self.target_modules:
            raise ValueError("LoraSpec.target_modules must name at least one module")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraSpec.dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        """``alpha / rank``: what ``B @ A`` is multiplied by."""
        return self.alpha / self.rank

    def at_rank(self, rank: int) -> LoraSpec:
        """The same adapter trained at ``rank``, alpha scaled along so the scale (alpha / rank) is
        the fleet's: every device's update then means the same, whatever its rank."""
        return self if rank == self.rank else dataclasses.replace(self, rank=rank, alpha=self.alpha * rank / self.rank)
