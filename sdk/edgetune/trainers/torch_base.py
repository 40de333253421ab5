"""What every PyTorch trainer shares, whatever the adapter: the local training loop (AdamW or
SGD, gradient accumulation, clipping, FedProx, the personalization penalty), one-gradient
FedSGD rounds and held-out perplexity.

A subclass wraps the frozen base with its adapter (``TorchLoraTrainer``: LoRA factors;
``TorchPromptTrainer``: a soft prompt), lists the trainable parameters by fleet name
(``_named``), and says how a batch becomes logits aligned with its tokens (``_logits``).
The loss is the same for both: mean next-token cross-entropy over the block's T − 1 predicted
tokens, so losses and perplexities compare across adapter kinds.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from ..wire import TrainSettings
from .result import TrainResult

log = logging.getLogger(__name__)

__all__ = ["TorchTrainer", "proximal_term"]


class TorchTrainer:
    """Base class; see the module docstring. Subclasses set ``model``, ``shapes`` and
    ``_params`` (trainable tensors, in ``shapes`` order) and implement ``_logits``."""

    model: torch.nn.Module
    shapes: dict[str, tuple[int, ...]]
    _params: list[torch.Tensor]

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self._params)

    @property
    def restores_base(self) -> bool:
        """``unload()`` leaves the plain base it was given, for a trainer of another
        configuration to wrap next (False: the workload loads the base again)."""
        return True

    def _logits(self, batch: np.ndarray) -> torch.Tensor:
        """(B, T, V) logits of a (B, T) token batch: position t predicts token t + 1."""
        raise NotImplementedError

    def _loss(self, batch: np.ndarray) -> torch.Tensor:
        ids = torch.as_tensor(np.asarray(batch, dtype=np.int64))
        logits = self._logits(batch)[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))

    def _optimizer(self, settings: TrainSettings, lr: float | None = None) -> torch.optim.Optimizer:
        lr = settings.learning_rate if lr is None else lr
        if settings.optimizer == "sgd":
            return torch.optim.SGD(self._params, lr=lr, weight_decay=settings.weight_decay)
        return torch.optim.AdamW(self._params, lr=lr, weight_decay=settings.weight_decay)

    def train(
        self,
        batches: Iterator[np.ndarray],
        settings: TrainSettings,
        on_step: Callable[[int, int, float], None] | None = None,
        *,
        l2_to_global: float = 0.0,
    ) -> TrainResult:
        """``settings.local_steps`` steps of ``settings.optimizer`` (AdamW or SGD) over the
        adapter, each averaging the gradients of ``settings.grad_accum`` micro-batches. The
        optimizer is new every call: after a federated round its moments describe an adapter
        that no longer exists.

        With ``settings.proximal_mu`` > 0 (FedProx) each step also minimises
        ``mu/2 · Σ‖θ − θ_start‖²``, θ_start being the adapter when this call began, through the
        gradient (AdamW normalises it, so mu acts relative to the data gradient's size).
        ``l2_to_global`` λ > 0 (personalization) pulls toward θ_start through the penalty's
        proximal map instead (``edgetune.trainers.penalty``): any λ is stable, λ → ∞ keeps θ.
        Reported losses stay the data loss.

        Stops early (with a warning) if ``batches`` runs out; raises if not one step was made.
        """
        optimizer = self._optimizer(settings)
        mu = settings.proximal_mu
        anchor = [p.detach().clone() for p in self._params] if mu > 0 or l2_to_global > 0 else []
        shrink = 1.0 / (1.0 + settings.learning_rate * l2_to_global)
        total = settings.local_steps
        losses: list[float] = []
        tokens = 0
        started = time.perf_counter()
        batches = iter(batches)
        # fork_rng: dropout is reproducible from the seed without touching the caller's RNG
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            self.model.train()
            try:
                for step in range(1, total + 1):
                    micro = list(itertools.islice(batches, settings.grad_accum))
                    if len(micro) < settings.grad_accum:
                        log.warning("training data ran out after %d of %d steps", step - 1, total)
                        break
                    optimizer.zero_grad(set_to_none=True)
                    step_loss = 0.0
                    for batch in micro:
                        loss = self._loss(batch)
                        (loss / settings.grad_accum).backward()
                        step_loss += loss.item() / settings.grad_accum
                        tokens += int(np.asarray(batch).size)
                    if mu > 0:
                        proximal_term(self._params, anchor, mu).backward()
                    if settings.max_grad_norm > 0:
                        torch.nn.utils.clip_grad_norm_(self._params, settings.max_grad_norm)
                    optimizer.step()
                    if l2_to_global > 0:
                        with torch.no_grad():
                            for p, a in zip(self._params, anchor, strict=True):
                                p.sub_(a).mul_(shrink).add_(a)
                    losses.append(step_loss)
                    if on_step is not None:
                        on_step(step, total, step_loss)
            finally:
                optimizer.zero_grad(set_to_none=True)
                self.model.eval()
        if not losses:
            raise ValueError("no training step was made: the batch iterator yielded too few batches")
        seconds = time.perf_counter() - started
        result = TrainResult(
            mean_loss=float(np.mean(losses)), final_loss=losses[-1], tokens=tokens, seconds=seconds, steps=len(losses)
        )
        log.info(
            "trained %d steps in %.2f s: loss %.4f -> %.4f (%d tokens)",
            result.steps, seconds, losses[0], result.final_loss, tokens,
        )
        return result

    def gradient(self, batches: Sequence[np.ndarray]) -> tuple[dict[str, np.ndarray], float, int]:
        """FedSGD: the gradient of the mean loss over ``batches`` (equal-size micro-batches,
        averaged) at the current adapter, by fleet name; and that loss and the tokens seen.
        Nothing is stepped, clipped or decayed: the server applies the fleet's average."""
        if not batches:
            raise ValueError("a gradient needs at least one batch")
        for p in self._params:
            p.grad = None
        loss_sum, tokens = 0.0, 0
        self.model.eval()  # no dropout: the gradient of the loss itself, nothing random
        for batch in batches:
            loss = self._loss(batch)
            (loss / len(batches)).backward()
            loss_sum += loss.item() / len(batches)
            tokens += int(np.asarray(batch).size)
        grads = {name: p.grad.detach().cpu().numpy().astype(np.float32, copy=True)
                 for name, p in zip(self.shapes, self._params, strict=True)}
        for p in self._params:
            p.grad = None
        return grads, loss_sum, tokens

    @torch.no_grad()
    def perplexity(self, blocks: np.ndarray, batch_size: int = 8) -> float:
        """exp of the mean next-token NLL over all predicted tokens of ``blocks`` (N, T),
        with the current adapter."""
        blocks = np.asarray(blocks, dtype=np.int64)
        if blocks.ndim != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
            raise ValueError(f"perplexity needs blocks of shape (N ≥ 1, T ≥ 2), got {blocks.shape}")
        self.model.eval()
        nll, count = 0.0, 0
        for start in range(0, len(blocks), batch_size):
            batch = blocks[start:start + batch_size]
            logits = self._logits(batch)[:, :-1]  # (B, T-1, V)
            targets = torch.from_numpy(batch[:, 1:])
            nll += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum"
            ).item()
            count += targets.numel()
        return math.exp(nll / count)


def proximal_term(params: Sequence[torch.Tensor], anchor: Sequence[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's ``mu/2 · Σ‖θ − θ_start‖²``; its gradient is ``mu · (θ − θ_start)``."""
    return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
