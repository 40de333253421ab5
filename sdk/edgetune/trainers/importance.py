"""Score a frozen base's weight matrices by how much the loss depends on them, to choose where
LoRA adapters go (docs/importance.md).

Per element, the sensitivity is I = |w · ∂L/∂w|: the first-order change of the loss if the
weight were set to zero. One batch's sensitivity is noisy, so it is smoothed as in AdaLoRA
(Zhang et al., ICLR 2023, eqs. 8–10), in this order, with both states starting at zero:

    Ī ← β1·Ī + (1 − β1)·I            (smoothed sensitivity)
    Ū ← β2·Ū + (1 − β2)·|I − Ī|      (its uncertainty, against the Ī just updated)
    s = Ī · Ū

No bias correction: every element has seen the same number of steps, so it would scale all
scores by one factor, which neither the ranking nor the fleet's normalisation sees.

A matrix's score is the sum of its elements' scores: the sensitivities are first-order
estimates of loss changes, and those add up over the elements of a matrix. A big matrix
therefore scores higher than a small one of the same per-element importance; that is wanted,
because ``planning.layout.select_layout`` weighs each score against the adapter's cost.

Memory is what makes this fit on a device. Gradients are never held for all matrices at once:
each candidate weight gets a post-accumulate-grad hook that folds its gradient into its two
states and drops it at once, so besides the states only one matrix's gradient (and a few
float32 temporaries of its size) lives at a time. The states are bfloat16: a ranking needs two
or three significant digits, and bfloat16 keeps float32's exponent range, so the tiny
sensitivities of a well-trained base do not underflow as they would in float16. That is 4 bytes
per candidate weight; the arithmetic inside the hook is float32.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..wire import ImportanceSettings

log = logging.getLogger(__name__)

__all__ = ["Forward", "ImportanceResult", "score_matrices"]

#: ``forward(model, input_ids (B, T)) -> scalar loss``; the default is a Hugging Face causal LM
Forward = Callable[[nn.Module, torch.Tensor], torch.Tensor]

_STATE_DTYPE = torch.bfloat16


@dataclass(frozen=True)
class ImportanceResult:
    """Scores (module name -> finite float ≥ 0) after ``batches`` forward and backward passes
    over ``tokens`` input tokens. ``state_bytes`` is what the smoothing states occupied."""

    scores: dict[str, float]
    tokens: int
    seconds: float
    batches: int
    state_bytes: int = 0


def score_matrices(
    model: nn.Module,
    modules: list[str],
    batches: Iterable[np.ndarray],
    settings: ImportanceSettings,
    forward: Forward | None = None,
) -> ImportanceResult:
    """Score the weight of each module in ``modules`` (full names of float ``nn.Linear`` or
    GPT-2 ``Conv1D`` layers of ``model``) over ``settings.batches`` token batches (B, T).

    ``model`` is a plain frozen base. Its ``requires_grad`` flags, any ``.grad`` and its
    train/eval mode are restored on return, also when this raises. It runs in eval mode, so
    dropout does not add noise to the sensitivities (and no random state is consumed).
    """
    weights = _candidate_weights(model, modules)
    forward = forward or _causal_lm_loss
    states = {name: _States.like(w) for name, w in weights.items()}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    stashed = {name: w.grad for name, w in weights.items()}
    modes = [(m, m.training) for m in model.modules()]  # a caller may mix train and eval
    handles = []
    tokens = done = 0
    started = time.perf_counter()
    try:
        model.requires_grad_(False)  # embeddings, norms, other layers: no gradients at all
        for name, w in weights.items():
            w.grad = None
            w.requires_grad_(True)
            handles.append(w.register_post_accumulate_grad_hook(states[name].folder(settings)))
        model.eval()
        with torch.enable_grad():
            for batch in itertools.islice(batches, settings.batches):
                ids = torch.as_tensor(np.asarray(batch, dtype=np.int64))  # (B, T)
                if ids.ndim != 2 or ids.shape[1] < 2:
                    raise ValueError(f"token batches must have shape (B, T ≥ 2), got {tuple(ids.shape)}")
                loss = forward(model, ids)
                if not torch.isfinite(loss):
                    raise ValueError(
                        f"the loss of calibration batch {done + 1} is {loss.item()}: check the data and the base"
                    )
                loss.backward()
                tokens += ids.numel()
                done += 1
    finally:
        for handle in handles:
            handle.remove()
        for name, w in weights.items():
            w.grad = stashed[name]  # also drops a gradient a failed backward left behind
        for p, flag in flags:
            p.requires_grad_(flag)
        for module, training in modes:
            module.training = training
    if done == 0:
        raise ValueError("no calibration batch: the batch iterator was empty")
    if done < settings.batches:
        log.warning("calibration data ran out after %d of %d batches", done, settings.batches)
    scores = {name: states[name].score() for name in sorted(weights)}
    seconds = time.perf_counter() - started
    state_bytes = sum(s.nbytes for s in states.values())
    log.info(
        "scored %d matrices over %d batches (%d tokens) in %.2f s; states %.1f MB",
        len(scores), done, tokens, seconds, state_bytes / 1e6,
    )
    return ImportanceResult(scores=scores, tokens=tokens, seconds=seconds, batches=done, state_bytes=state_bytes)


class _States:
    """One weight's smoothed sensitivity Ī and uncertainty Ū, elementwise, in bfloat16."""

    def __init__(self, avg: torch.Tensor, unc: torch.Tensor) -> None:
        self.avg = avg
        self.unc = unc

    @classmethod
    def like(cls, weight: torch.Tensor) -> _States:
        return cls(*(torch.zeros(weight.shape, dtype=_STATE_DTYPE, device=weight.device) for _ in range(2)))

    @property
    def nbytes(self) -> int:
        return self.avg.nbytes + self.unc.nbytes

    def folder(self, settings: ImportanceSettings) -> Callable[[torch.Tensor], None]:
        """The hook that folds a freshly accumulated gradient into the states and frees it."""
        beta1, beta2 = settings.beta1, settings.beta2

        @torch.no_grad()
        def fold(param: torch.Tensor) -> None:
            grad, param.grad = param.grad, None
            sens = (grad.float() * param.float()).abs_()  # I = |w · ∂L/∂w|; Conv1D: (in, out)
            del grad  # (out of place above: autograd may still alias the gradient it handed over)
            avg = self.avg.float().mul_(beta1).add_(sens, alpha=1.0 - beta1)
            sens.sub_(avg).abs_()  # |I − Ī|, against the Ī just updated (AdaLoRA eq. 9)
            self.unc.copy_(self.unc.float().mul_(beta2).add_(sens, alpha=1.0 - beta2))
            self.avg.copy_(avg)

        return fold

    def score(self) -> float:
        """Σ Ī·Ū over the matrix: products in float32, the sum in float64."""
        total = (self.avg.float() * self.unc.float()).sum(dtype=torch.float64).item()
        if not math.isfinite(total) or total < 0:
            raise ValueError(
                f"an importance score came out {total}: the gradients overflowed; use fewer or shorter batches"
            )
        return total


def _candidate_weights(model: nn.Module, modules: list[str]) -> dict[str, nn.Parameter]:
    """Each module's weight, after checking it is a float linear layer we can score."""
    if not modules:
        raise ValueError("no modules to score: pass the full names of the candidate linear layers")
    if len(set(modules)) != len(modules):
        raise ValueError(f"modules lists a layer twice: {sorted(m for m in set(modules) if modules.count(m) > 1)}")
    weights: dict[str, nn.Parameter] = {}
    for name in modules:
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the model has no module {name!r}: pass full names from its manifest") from None
        if not isinstance(layer, (nn.Linear, Conv1D)):
            raise ValueError(
                f"{name} is a {type(layer).__name__}, not a linear layer: only Linear and Conv1D weights can be scored"
            )
        weight = layer.weight
        if type(weight) is not nn.Parameter or not weight.dtype.is_floating_point:
            raise ValueError(
                f"{name} stores its weight as {type(weight).__name__} of {weight.dtype}: importance scoring "
                "needs a float base (float32 or bfloat16); load the model again without quantization"
            )
        if any(weight is w for w in weights.values()):
            raise ValueError(f"{name} shares its weight with another listed module: list it once")
        weights[name] = weight
    return weights


def _causal_lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The next-token loss, fed the way the trainers feed it: explicit mask and positions,
    no KV cache (whole blocks, and a cache would only cost memory)."""
    mask = torch.ones_like(ids)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, labels=ids, use_cache=False).loss
