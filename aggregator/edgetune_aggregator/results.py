"""A device's answer to a round: is it for this round, from a member, the first time, and does
its content fit? Then it is journaled, accepted, and acknowledged with a receipt.

A mixin of the daemon (``Aggregator``): these are the round loop's steps for one result,
kept apart from the loop itself. Every refusal is a counted reason (docs/security.md).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from edgetune.adapters.tensors import as_float32
from edgetune.adapters.lora import targets
from edgetune.adapters.registry import adapter_kind, adapter_shapes
from edgetune.transport import TransportError
from edgetune.wire import (
    AdapterInit,
    EvalReport,
    ImportanceReport,
    Receipt,
    Signed,
    TaskKind,
    Update,
    decode_message,
    encode_message,
)
from edgetune.wire.signing import unwrap

from .store import DeviceRecord, RoundRecord
from .validation import Refusal, check_layout, check_norm, check_samples, delta_norm

log = logging.getLogger("edgetune_aggregator.daemon")


class ResultHandling:
    """Expects the daemon's ``state``, ``config``, ``devices``, ``journal``, ``channel``,
    ``topics``, ``intake``, ``metrics``, ``_task``, ``_counted``, ``answered`` and ``_round_bases``."""

    def _on_result(self, topic: str, opened, ctx: RoundContext | None) -> None:
        """A device's answer to a round: checked, written to the journal, then acknowledged
        with a ``Receipt`` (a device resends an unanswered result with the same nonce)."""
        message, sender = opened.message, opened.message.device_id
        refusal = self._check_result(message, opened.nonce, ctx) or self._check_content(message, ctx)
        norm = None
        if refusal is None and isinstance(message, Update):
            # its norm, computed once (on a delta whose layout passed): checked here, recorded
            # with the round, and what the merge bounds it by
            norm = delta_norm(message.delta)
            refusal = self._check_norm(message, norm)
        if refusal is not None:
            self.channel.drop(sender, topic, refusal.reason, refusal.detail)
            # an unknown sender gets no answer; a replay got its first answer again
            if refusal.reason not in ("unknown_device", "replayed"):
                self._receipt(message, opened.nonce, refusal.reason, ctx)
            return
        if ctx.journal:  # on disk before anyone hears of it: a crash after this keeps it
            payload = encode_message(opened.signed if opened.signed is not None else message)
            self.journal.record(ctx.number, sender, payload, message.round if message.round < ctx.number else None)
            if self.metrics is not None and "storage" in self.metrics.problems:
                self._storage_recovered()
        self._accept(ctx, message, opened.nonce, norm)
        self._receipt(message, opened.nonce, "", ctx)
        if self.metrics is not None:
            self.metrics.accepted(ctx.kind.value)

    def _receipt(self, message, nonce: bytes, reason: str, ctx: RoundContext | None) -> None:
        receipt = Receipt(message.device_id, message.round, nonce, not reason, reason)
        if ctx is not None:
            ctx.remember(receipt)
        try:
            self.channel.send(self.topics.receipt(message.device_id), receipt)
        except TransportError as exc:  # the device resends and gets the receipt then
            log.warning("could not send %s its receipt: %s", message.device_id, exc)

    def _check_result(self, message, nonce: bytes, ctx: RoundContext | None) -> Refusal | None:
        """Whether a result belongs to the open round, from a member, for the first time."""
        sender = message.device_id
        expected_kind = {Update: TaskKind.TRAIN, EvalReport: TaskKind.EVALUATE,
                         ImportanceReport: TaskKind.CALIBRATE, AdapterInit: TaskKind.INITIALIZE}[type(message)]
        if sender not in self.devices:
            return Refusal("unknown_device", "no hello received from it")
        if self.state and sender in self.state.left_out:
            return Refusal("init_mismatch", f"left out of this fleet: its starting adapter differed "
                           f"({self.state.left_out[sender]})")
        current = ctx.number if ctx else (self.state.round if self.state else 0) + 1
        if message.round < current or (ctx is None and self.state and message.round <= self.state.round):
            if not (self.config.max_staleness and isinstance(message, Update) and ctx and ctx.kind is TaskKind.TRAIN):
                return Refusal("stale_round", f"{type(message).__name__} for round {message.round}, which is closed")
            return self._check_late(message, nonce, ctx)
        if ctx is None or ctx.kind is not expected_kind or message.round != ctx.number:
            open_round = f"round {ctx.number} ({ctx.kind.value})" if ctx else "no round"
            return Refusal("unknown_round", f"{type(message).__name__} for round {message.round}; {open_round} is open")
        earlier = ctx.answered(sender, nonce)
        if earlier is not None:
            # the same signed message again: a device resending (the receipt is repeated) or a replay
            self._resend_receipt(earlier)
            return Refusal("replayed", f"nonce {nonce.hex()[:8]}… was seen in round {ctx.number} already")
        if sender in ctx.seen:
            return Refusal("duplicate", f"second result for round {ctx.number}")
        return None

    def _check_late(self, update: Update, nonce: bytes, ctx: RoundContext) -> Refusal | None:
        """A late update may join the open round (FedBuff): once per device and round."""
        sender = update.device_id
        earlier = ctx.answered(sender, nonce)
        if earlier is not None:
            self._resend_receipt(earlier)
            return Refusal("replayed", f"nonce {nonce.hex()[:8]}… was seen in round {ctx.number} already")
        if self._round_bases.get(update.round) != update.base_version:
            return Refusal("stale_round", f"no train round {update.round} started from v{update.base_version} "
                           f"within the last {self.config.max_staleness} version(s)")
        if (sender, update.round) in self._counted:
            return Refusal("duplicate", f"{sender}'s update for round {update.round} is counted already")
        return None

    def _resend_receipt(self, receipt: Receipt) -> None:
        try:
            self.channel.send(self.topics.receipt(receipt.device_id), receipt)
        except TransportError as exc:
            log.warning("could not resend %s its receipt: %s", receipt.device_id, exc)

    def _check_content(self, message, ctx: RoundContext | None) -> Refusal | None:
        """The result's content fits the fleet: layout, values and the configured bounds."""
        if isinstance(message, Update):
            return self._check_update(message, late=ctx is not None and message.round < ctx.number)
        if isinstance(message, AdapterInit):
            return check_layout(message.tensors, adapter_shapes(self.state.adapter, self.state.model))
        if isinstance(message, ImportanceReport):
            unknown = message.scores.keys() - set(targets(self._task.adapter, self.state.model.modules))
            if unknown:
                return Refusal("bad_scores", f"scores for {len(unknown)} unknown matrices, e.g. {sorted(unknown)[:2]}")
            if not message.scores:
                return Refusal("bad_scores", "no scores")
            if not all(math.isfinite(v) and v >= 0 for v in message.scores.values()):
                return Refusal("bad_scores", "scores must be finite and ≥ 0")
        return None

    def _check_update(self, update: Update, late: bool = False) -> Refusal | None:
        if update.run_id != self.state.run_id and (update.run_id or self.intake.keyring is not None):
            # (an unsigned fleet accepts older SDKs, which send no run id)
            return Refusal("other_run", f"update for run {update.run_id or '(none)'}, this is run {self.state.run_id}")
        lag = self.state.global_version - update.base_version
        if late and not 1 <= lag <= self.config.max_staleness:
            return Refusal("stale_round", f"late update against v{update.base_version}, {lag} versions behind "
                           f"v{self.state.global_version} (at most {self.config.max_staleness})")
        if not late and lag != 0:
            return Refusal("stale_base", f"delta against v{update.base_version}, global is v{self.state.global_version}")
        refusal = check_samples(update.num_samples, self.config.limits)
        if refusal:
            return refusal
        spec = self.state.adapter
        try:  # (a low-rank kind: devices planned at a lower rank send the leading components)
            shapes = adapter_kind(spec).update_shapes(spec, self.state.model, update.delta)
        except ValueError as exc:
            return Refusal("wrong_shape", str(exc))
        return check_layout(update.delta, shapes)

    def _check_norm(self, update: Update, norm: float) -> Refusal | None:
        refusal = check_norm(norm, self.config.limits)
        if refusal is None and self.config.limits.max_norm is not None and norm > self.config.limits.max_norm:
            log.info("update from %s has norm %.4g: clipped to %.4g", update.device_id, norm, self.config.limits.max_norm)
        return refusal

    def _replay(self, ctx: RoundContext, device: str, payload: bytes) -> None:
        """Re-accept a journaled result after a restart (checked when it first arrived)."""
        message = decode_message(payload)
        nonce = message.nonce if isinstance(message, Signed) else b""
        message = unwrap(message)
        self._accept(ctx, message, nonce, delta_norm(message.delta) if isinstance(message, Update) else None)
        ctx.remember(Receipt(message.device_id, message.round, nonce, True))

    def _accept(self, ctx: RoundContext, message, nonce: bytes, norm: float | None = None) -> None:
        sender = message.device_id
        self.answered.setdefault(sender, ctx.number)
        if isinstance(message, Update) and message.round < ctx.number:  # late (FedBuff), or carried over
            self._counted.add((sender, message.round))
            if message.base_version == self.state.global_version:  # carried from a failed round: it is
                ctx.seen.add(sender)  # this device's result for this round too
            lag = self.state.global_version - message.base_version
            ctx.record.devices.append(DeviceRecord(sender, message.num_samples, message.metrics.train_loss,
                                                   from_round=message.round, norm=norm))
            log.info("round %d: late update from %s for round %d (%d version(s) behind)", ctx.number, sender,
                     message.round, lag)
            return
        ctx.seen.add(sender)
        if isinstance(message, Update):
            self._counted.add((sender, ctx.number))
        if isinstance(message, EvalReport):
            ctx.record.devices.append(DeviceRecord(sender, message.num_samples,
                                                   global_ppl=_score(message.metrics.global_ppl, sender),
                                                   global_robust_ppl=_score(message.metrics.robust_ppl, sender)))
            return
        if isinstance(message, AdapterInit):
            ctx.inits[sender] = {name: np.array(as_float32(t), dtype=np.float32) for name, t in message.tensors.items()}
            ctx.record.devices.append(DeviceRecord(sender, 1))
            log.info("round %d: starting adapter from %s", ctx.number, sender)
            return
        if isinstance(message, ImportanceReport):
            ctx.reports.append(message)
            ctx.record.devices.append(DeviceRecord(sender, message.num_samples, train_tokens=message.tokens,
                                                   train_seconds=message.seconds))
            log.info("round %d: importance scores from %s (%d matrices)", ctx.number, sender, len(message.scores))
            return
        m = message.metrics
        ctx.record.devices.append(DeviceRecord(
            sender, message.num_samples, m.train_loss, _score(m.local_ppl, sender), _score(m.global_ppl, sender),
            m.train_tokens, m.train_seconds, m.bytes_sent, m.bytes_received, _score(m.global_robust_ppl, sender),
            _score(m.local_robust_ppl, sender), norm=norm,
        ))
        log.info("round %d: update from %s (%d samples, loss %.3f)", ctx.number, sender, message.num_samples, m.train_loss)


@dataclass
class RoundContext:
    number: int
    kind: TaskKind
    record: RoundRecord
    #: accepted results are written to the round journal (train and evaluate rounds)
    journal: bool = False
    seen: set[str] = field(default_factory=set)
    #: (device, nonce) -> the receipt it got: a resent or replayed result gets it again
    receipts: dict[tuple[str, bytes], Receipt] = field(default_factory=dict)
    #: the latest refusal per device (a device with a key could send refused results without
    #: end: only its last is kept, so the round's memory follows the fleet, not the traffic)
    refusals: dict[str, Receipt] = field(default_factory=dict)

    def remember(self, receipt: Receipt) -> None:
        if receipt.accepted:
            self.receipts[(receipt.device_id, receipt.nonce)] = receipt
        else:
            self.refusals[receipt.device_id] = receipt

    def answered(self, device: str, nonce: bytes) -> Receipt | None:
        """The receipt this exact message got already in this round, if any."""
        if not nonce:
            return None
        refusal = self.refusals.get(device)
        return self.receipts.get((device, nonce)) or (refusal if refusal and refusal.nonce == nonce else None)
    reports: list[ImportanceReport] = field(default_factory=list)
    #: initialization rounds: each device's starting adapter
    inits: dict[str, dict] = field(default_factory=dict)
    #: devices that reported giving this round up (an error report), and why: not waited for
    declined: dict[str, str] = field(default_factory=dict)


def _score(value: float | None, device: str) -> float | None:
    """A reported perplexity, or None if it is not one (finite, > 0): an optional metric must
    neither poison the round's averages nor cost the device its update."""
    if value is None or (math.isfinite(value) and value > 0):
        return value
    log.warning("device %s reported perplexity %r; ignored", device, value)
    return None
