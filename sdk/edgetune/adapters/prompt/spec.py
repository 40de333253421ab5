"""The soft-prompt spec: how many virtual tokens, and how the fleet's first prompt is made. It
travels in every task (``edgetune.wire`` re-exports it), so it imports nothing of the wire."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PROMPT_INITS", "PromptSpec"]

PROMPT_INITS = ("vocab", "random", "text")


@dataclass(frozen=True)
class PromptSpec:
    """A soft prompt (PEFT prompt tuning): ``num_virtual_tokens`` trainable embeddings put
    before every input; the frozen model is otherwise untouched. One tensor,
    ``prompt_embeddings`` of shape (num_virtual_tokens, hidden_size).

    Its start needs the base's token embeddings, which only devices hold, so a prompt fleet
    begins with an initialization round (``TaskKind.INITIALIZE``): ``init="vocab"`` takes the
    embeddings of ``num_virtual_tokens`` vocabulary tokens drawn with the task's seed,
    ``init="random"`` Gaussian vectors (seeded) with the embedding matrix's standard deviation,
    ``init="text"`` the embeddings of ``init_text``'s tokens, repeated or cut to length (PEFT's
    SAMPLE_VOCAB, RANDOM and TEXT initialisations; PEFT's RANDOM uses a unit Gaussian, which is
    far larger than a small model's embeddings).
    """

    num_virtual_tokens: int = 20
    init: str = "vocab"
    init_text: str = ""
    kind: str = "prompt"

    def __post_init__(self) -> None:
        if self.kind != "prompt":
            raise ValueError(f"PromptSpec.kind must be 'prompt', got {self.kind!r}")
        if not 1 <= self.num_virtual_tokens <= 1024:
            raise ValueError(f"PromptSpec.num_virtual_tokens must be in 1..1024, got {self.num_virtual_tokens}")
        if self.init not in PROMPT_INITS:
            raise ValueError(f"PromptSpec.init {self.init!r} is not one of {', '.join(PROMPT_INITS)}")
        if self.init == "text" and not self.init_text.strip():
            raise ValueError("PromptSpec.init 'text' needs a non-empty init_text")
        if len(self.init_text) > 10_000:
            raise ValueError("PromptSpec.init_text is longer than 10,000 characters")
