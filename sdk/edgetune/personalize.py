"""Personalization after (or between) federated rounds: the Profit recipe as product features.

A device fine-tunes the global adapter θ_g on its own data into θ_local — with its own learning
rate, steps or epochs, optimizer (AdamW or SGD) and an ℓ2 pull toward the global adapter
(``loss + λ/2·‖θ − θ_g‖²``, ``edgetune.trainers.penalty``) — then serves the interpolation

    θ = (1 − α)·θ_g + α·θ_local

with α given, or chosen on a validation split of its own training data that personalization
did not train on. Both ends are kept: α = 0 is the global adapter (robust: it learned from
everyone), α = 1 the local one (personal: it fits this site). ``docs/personalization.md``
describes the trade-off and the benchmark that measures it.

For a soft prompt the interpolation is of the prompt itself (it enters the model linearly).
For LoRA it is of the *weight updates*: ``W + (1 − α)·ΔW_g + α·ΔW_local``, the exact
interpolation of the two models. Interpolating the factors instead would add cross terms
(``((1−α)B_g + αB_l)((1−α)A_g + αA_l)``) and neither end of the segment would be a model
anyone trained in between. The result is written as the local factors with B scaled by α plus
the global factors, scaled by 1 − α, folded into the frozen ``merged`` delta — an adapter every
trainer and ``PeftModel.from_pretrained`` (via ``write_peft_adapter``) can load as is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .adapters.registry import adapter_kind
from .wire import CLIENT_OPTIMIZERS, AdapterSpec

log = logging.getLogger(__name__)

__all__ = ["PersonalizeSettings", "PersonalAdapter", "interpolate", "choose_alpha", "DEFAULT_ALPHAS"]

#: the α grid searched on the validation split when no α is given
DEFAULT_ALPHAS = tuple(round(a / 10, 1) for a in range(11))


@dataclass(frozen=True)
class PersonalizeSettings:
    """How a device personalizes. ``epochs`` > 0 overrides ``steps`` (passes over its own
    training data). ``alpha`` None: chosen from ``alphas`` on the validation split."""

    learning_rate: float = 1e-4
    steps: int = 20
    epochs: int = 0
    optimizer: str = "adamw"
    l2_to_global: float = 0.0
    alpha: float | None = None
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    batch_size: int = 4
    seq_len: int = 128
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    #: share of the device's training texts held back to choose α (personalization does not train on them)
    validation_fraction: float = 0.15
    seed: int = 0

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.steps < 1 or self.epochs < 0 or self.batch_size < 1 or self.seq_len < 2:
            raise ValueError("steps and batch_size must be ≥ 1, epochs ≥ 0, seq_len ≥ 2")
        if self.optimizer not in CLIENT_OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r} is not one of {', '.join(CLIENT_OPTIMIZERS)}")
        if self.l2_to_global < 0:
            raise ValueError(f"l2_to_global must be ≥ 0, got {self.l2_to_global}")
        for a in ([self.alpha] if self.alpha is not None else list(self.alphas)):
            if not 0.0 <= a <= 1.0:
                raise ValueError(f"α must be in [0, 1], got {a}")
        if self.alpha is None and not self.alphas:
            raise ValueError("give alpha, or alphas to choose it from")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction}")


@dataclass(frozen=True)
class PersonalAdapter:
    """A device's personal adapter: what it serves instead of the global one after
    ``Device.personalize`` (``tensors`` and ``merged`` as in a ``GlobalAdapter``)."""

    base_version: int
    spec: AdapterSpec
    alpha: float
    tensors: dict[str, np.ndarray]
    merged: dict[str, np.ndarray] = field(default_factory=dict)
    #: validation perplexity at each α tried (empty when α was given)
    validation: dict[float, float] = field(default_factory=dict)
    #: perplexity on the device's validation split of the global version it started from, and
    #: of this adapter: it is served only if it does no worse (None: no validation split)
    global_validation_ppl: float | None = None
    validation_ppl: float | None = None

    @property
    def better_than_global(self) -> bool:
        """Whether it may be served: no worse than the global version on the validation split
        (without one, on the held-out text its report scores)."""
        if self.global_validation_ppl is None or self.validation_ppl is None:
            return True
        return self.validation_ppl <= self.global_validation_ppl


def interpolate(spec: AdapterSpec, global_tensors: Mapping[str, np.ndarray], global_merged: Mapping[str, np.ndarray],
                local_tensors: Mapping[str, np.ndarray], alpha: float) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(tensors, merged)`` of the model ``(1 − α)·global + α·local`` (see the module
    docstring; each kind does its own, ``AdapterKind.interpolate``). ``local_tensors`` were
    trained from ``global_tensors`` with the global's merged delta frozen, at the same rank."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"α must be in [0, 1], got {alpha}")
    return adapter_kind(spec).interpolate(spec, global_tensors, global_merged, local_tensors, alpha)


def choose_alpha(evaluate: Callable[[float], float], alphas: Sequence[float]) -> tuple[float, dict[float, float]]:
    """The α of ``alphas`` with the lowest ``evaluate(α)`` (validation perplexity), and every
    value seen. Ties go to the smaller α: the one closer to the global adapter, which the
    whole fleet's data stands behind."""
    if not alphas:
        raise ValueError("no α to choose from")
    seen = {float(a): float(evaluate(float(a))) for a in sorted(set(alphas))}
    best = min(seen, key=lambda a: (seen[a], a))
    log.info("α on the validation split: %s -> %.2f",
             ", ".join(f"{a:g}: {v:.3f}" for a, v in seen.items()), best)
    return best, seen


def personalize(workload, adapter, settings: PersonalizeSettings, device_id: str, max_eval_blocks: int = 16,
                quantization: str = "float32", rank: int | None = None, checkpointing: bool = False):
    """Fine-tune ``adapter`` (a ``GlobalAdapter``) on ``workload``'s own data and choose α:
    ``(PersonalAdapter, PersonalizationReport)``. The trainer is left holding the personal
    adapter. Used by ``Device.personalize`` and the personalization benchmark.

    ``quantization``, ``rank`` and ``checkpointing`` are what the device's last plan gave it
    (memory it can afford; None: the fleet's rank). A LoRA above that rank, or above the rank
    the device's backend trains (ONNX Runtime artifacts), is trained at the lower rank, the
    remaining components frozen in the merged delta, as in a round."""
    import dataclasses

    from .wire import PersonalizationReport, TrainSettings

    caps = [r for r in (rank, workload.max_rank) if r]
    begin = adapter_kind(adapter.adapter).training_start(adapter.adapter, adapter.tensors, adapter.merged,
                                                         min(caps) if caps else None)
    spec, start, frozen = begin.spec, begin.tensors, begin.merged
    trainer = workload.trainer(spec, quantization, checkpointing)
    train_blocks, val_blocks = workload.personal_split(settings.seq_len, settings.validation_fraction, settings.seed)
    heldout = workload.heldout_blocks(settings.seq_len)[:max_eval_blocks]
    robust = workload.robustness_blocks(settings.seq_len, max_eval_blocks)
    val_blocks = val_blocks[:max_eval_blocks]

    def load(alpha: float, local: Mapping[str, np.ndarray] | None) -> None:
        if local is None:
            tensors, merged = start, frozen
        else:
            tensors, merged = interpolate(spec, start, frozen, local, alpha)
        trainer.set_adapter(tensors)
        trainer.set_merged(merged)

    def scores() -> tuple[float, float | None]:
        return trainer.perplexity(heldout), (trainer.perplexity(robust) if len(robust) else None)

    load(0.0, None)
    global_ppl, global_robust = scores()
    global_val = trainer.perplexity(val_blocks) if len(val_blocks) else None
    steps = settings.steps
    if settings.epochs:
        steps = settings.epochs * -(-len(train_blocks) // settings.batch_size)
    train = TrainSettings(local_steps=steps, batch_size=settings.batch_size, learning_rate=settings.learning_rate,
                          weight_decay=settings.weight_decay, max_grad_norm=settings.max_grad_norm,
                          seq_len=settings.seq_len, seed=settings.seed, optimizer=settings.optimizer)
    result = trainer.train(workload.batches_from(train_blocks, settings.batch_size, settings.seed), train,
                           l2_to_global=settings.l2_to_global)
    local = trainer.get_adapter()
    local_ppl, local_robust = scores()
    if settings.alpha is not None:
        alpha, validation = float(settings.alpha), {}
    else:
        def evaluate(a: float) -> float:
            load(a, local)
            return trainer.perplexity(val_blocks)

        alpha, validation = choose_alpha(evaluate, settings.alphas)
    tensors, merged = interpolate(spec, start, frozen, local, alpha)
    trainer.set_adapter(tensors)
    trainer.set_merged(merged)
    personal_ppl, personal_robust = scores()
    personal_val = (validation.get(alpha) or trainer.perplexity(val_blocks)) if len(val_blocks) else None
    if global_val is None:  # (no validation split: the held-out text is what there is to compare on)
        global_val, personal_val = global_ppl, personal_ppl
    personal = PersonalAdapter(adapter.version, spec, alpha, tensors, merged, validation, global_val, personal_val)
    report = PersonalizationReport(
        device_id, adapter.version, alpha, global_ppl, local_ppl, personal_ppl, global_robust, local_robust,
        personal_robust, {f"{a:g}": v for a, v in validation.items()},
        {k: str(v) for k, v in dataclasses.asdict(settings).items() if k in
         ("learning_rate", "steps", "epochs", "optimizer", "l2_to_global", "batch_size")} | {"trained_steps": str(result.steps)},
        result.seconds,
    )
    log.info("%s personalized v%d (%d steps, λ=%g, α=%.2f): own ppl %.2f -> %.2f (local %.2f)%s", device_id,
             adapter.version, result.steps, settings.l2_to_global, alpha, global_ppl, personal_ppl, local_ppl,
             f"; others' ppl {global_robust:.2f} -> {personal_robust:.2f}" if global_robust is not None else "")
    return personal, report
