"""Train rounds: an update is checked against the fleet (run, base version, sample claim,
layout at the device's rank, norm), recorded with what its weight needs, and at the close the
journaled updates are streamed through the weighting (``weighting.py``) into the strategy; the
candidate global is checked (``guard.py``) and, if it passes, stored as the next version.

Late updates (FedBuff-style, ``max_staleness``) trained on a global a few versions old may join
the open round once per device and round: ``round_bases`` and ``counted`` remember the rounds
they may come from and which are in a global already. A failed train round merged nothing, so
its journaled updates are carried into the next train round (``carried``).
"""

from __future__ import annotations

import logging
import time

from edgetune.adapters.registry import adapter_shapes
from edgetune.wire import FILE_VERSIONS, GlobalAdapter, TaskKind, Update, decode_message
from edgetune.wire.signing import unwrap

from ..config import AggregatorConfig
from ..fleet import Fleet
from ..guard import check_candidate
from ..influence import lower_median
from ..journal import JournalRecord, RoundJournal, parse_name, result_name
from ..store import DeviceRecord, RoundStatus
from ..strategies import NextGlobal, RoundStart
from ..validation import Refusal, check_layout, check_norm, check_samples, delta_norm, measure_delta
from ..weighting import Entry, Weighting
from .base import RoundContext, TaskHandler, score

log = logging.getLogger("edgetune_aggregator.daemon")


class TrainHandler(TaskHandler):
    kind = TaskKind.TRAIN

    def __init__(self, config: AggregatorConfig, fleet: Fleet, journal: RoundJournal, signed_fleet: bool = False,
                 metrics=None):
        self.config = config
        #: the fleet has device keys: an update must name this run (an unsigned fleet accepts older SDKs)
        self.signed_fleet = signed_fleet
        self.fleet = fleet
        self.journal = journal
        self.metrics = metrics
        self.weighting = Weighting(config.limits, config.influence, config.staleness_exponent, config.robust,
                                   config.trim)
        #: (device, round) of every update in a global adapter or the open round, for the
        #: rounds a late update may still come from: none is counted twice
        self.counted: set[tuple[str, int]] = set()
        #: train round -> the global version it started from, for the rounds a late update may
        #: still come from (the versions within ``max_staleness`` of the current one)
        self.round_bases: dict[int, int] = {}
        #: the open round's accepted updates: (device, round it trained for if late) -> what
        #: the weighting needs, recorded on arrival
        self._entries: dict[tuple[str, int | None], Entry] = {}
        #: with workers (``config.workers``): result name -> the worker holding the update
        self.holders: dict[str, str] = {}
        #: with workers: ``announce(round, bases)`` says what the open round takes;
        #: ``collect(request)`` sends the close's plan and yields every holder's share
        self.announce = None
        self.collect = None

    # --- bookkeeping across rounds ---------------------------------------------------------

    def resume(self, records: list[dict]) -> None:
        """The rounds of ``rounds.json`` (a resumed daemon): their bases, what they counted."""
        lineage = self.fleet.state.lineage_round  # (rounds of a lineage a rollback left: none may count)
        for record in records:
            if record["kind"] == TaskKind.TRAIN.value and record["round"] >= lineage:
                self.round_bases[record["round"]] = record["base_version"]
                self.counted |= {(d["device_id"], record["round"] if d.get("from_round") is None else d["from_round"])
                                 for d in record["devices"]}
        self.forget_old_rounds()

    def begin(self, ctx: RoundContext) -> None:
        self.round_bases[ctx.number] = self.fleet.state.global_version
        self._entries = {}
        self.holders = {}
        if self.announce is not None:
            self.announce(ctx.number, dict(self.round_bases))

    def held(self, update: Update, ctx: RoundContext, worker: str) -> None:
        late = update.round if update.round < ctx.number else None
        self.holders[result_name(update.device_id, late)] = worker

    def forget_lineage(self) -> None:
        """Training restarts from an older version (a rollback): no late update trained on a
        version after it may join, and nothing counted toward them matters any more."""
        self.round_bases, self.counted = {}, set()

    def forget_old_rounds(self) -> None:
        """Keep only the rounds whose global is young enough for a late update to join."""
        oldest = self.fleet.state.global_version - self.config.max_staleness
        self.round_bases = {r: base for r, base in self.round_bases.items() if base >= oldest}
        self.counted = {(d, r) for d, r in self.counted if r in self.round_bases}

    def carried(self, number: int) -> dict[str, tuple[JournalRecord, tuple[str, int]]]:
        """The accepted results of failed train rounds before ``number``, still journaled:
        result name in this round -> (file, (device, round it was trained for)). A failed
        round merged nothing and left the global version as it was, so they belong here."""
        failed = {r["round"] for r in self.fleet.store.rounds() if r["kind"] == TaskKind.TRAIN.value
                  and r["status"] == RoundStatus.FAILED.value}
        carried = {}
        for previous in self.journal.numbers():
            old = self.journal.load(previous) if previous < number and previous in failed else None
            if old is None or old.kind != TaskKind.TRAIN.value:
                continue
            for name, path in old.results.items():
                device, trained_for = parse_name(name)
                trained_for = previous if trained_for is None else trained_for
                carried[result_name(device, trained_for)] = (path, (device, trained_for))
        return carried

    # --- one update ------------------------------------------------------------------------

    def check(self, update: Update, ctx: RoundContext | None, content: bool = True) -> Refusal | None:
        state, late = self.fleet.state, ctx is not None and update.round < ctx.number
        if update.run_id != state.run_id and (update.run_id or self.signed_fleet):
            # (an unsigned fleet accepts older SDKs, which send no run id)
            return Refusal("other_run", f"update for run {update.run_id or '(none)'}, this is run {state.run_id}")
        lag = state.global_version - update.base_version
        if late and not 1 <= lag <= self.config.max_staleness:
            return Refusal("stale_round", f"late update against v{update.base_version}, {lag} versions behind "
                           f"v{state.global_version} (at most {self.config.max_staleness})")
        if not late and lag != 0:
            return Refusal("stale_base", f"delta against v{update.base_version}, global is v{state.global_version}")
        refusal = check_samples(update.num_samples, self.config.limits)
        if refusal or not content:
            return refusal
        try:  # (a low-rank kind: devices planned at a lower rank send the leading components)
            shapes = self.fleet.kind.update_shapes(state.adapter, state.model, update.delta)
        except ValueError as exc:
            return Refusal("wrong_shape", str(exc))
        return check_layout(update.delta, shapes, values=False)  # (its values: read once, by measure)

    def measure(self, update: Update, replayed: bool = False,
                measured: tuple[float, Refusal | None] | None = None) -> tuple[float | None, Refusal | None]:
        # its norm, computed once with the finite check (on the intake thread, if it could):
        # checked here, recorded with the round, what the merge bounds it by
        norm, refusal = measure_delta(update.delta) if measured is None else measured
        if refusal is not None:
            return None, refusal
        refusal = check_norm(norm, self.config.limits)
        if (refusal is None and not replayed and self.config.limits.max_norm is not None
                and norm > self.config.limits.max_norm):
            log.info("update from %s has norm %.4g: clipped to %.4g", update.device_id, norm,
                     self.config.limits.max_norm)
        return norm, refusal

    @property
    def accepts_late(self) -> bool:
        return bool(self.config.max_staleness)

    def late(self, update: Update, ctx: RoundContext) -> Refusal | None:
        """A late update may join the open round (FedBuff): once per device and round."""
        if self.round_bases.get(update.round) != update.base_version:
            return Refusal("stale_round", f"no train round {update.round} started from v{update.base_version} "
                           f"within the last {self.config.max_staleness} version(s)")
        if (update.device_id, update.round) in self.counted:
            return Refusal("duplicate", f"{update.device_id}'s update for round {update.round} is counted already")
        return None

    def accept(self, ctx: RoundContext, update: Update, norm: float | None) -> None:
        sender, lag = update.device_id, self.fleet.state.global_version - update.base_version
        norm = delta_norm(update.delta) if norm is None else norm
        if update.round < ctx.number:  # late (FedBuff), or carried over from a failed round
            self.counted.add((sender, update.round))
            if update.base_version == self.fleet.state.global_version:  # carried from a failed round: it
                ctx.seen.add(sender)  # is this device's result for this round too
            self._entries[(sender, update.round)] = Entry(update.num_samples, norm, lag)
            ctx.record.devices.append(DeviceRecord(sender, update.num_samples, update.metrics.train_loss,
                                                   from_round=update.round, norm=norm))
            log.info("round %d: late update from %s for round %d (%d version(s) behind)", ctx.number, sender,
                     update.round, lag)
            return
        ctx.seen.add(sender)
        self.counted.add((sender, ctx.number))
        self._entries[(sender, None)] = Entry(update.num_samples, norm, lag)
        m = update.metrics
        ctx.record.devices.append(DeviceRecord(
            sender, update.num_samples, m.train_loss, score(m.local_ppl, sender), score(m.global_ppl, sender),
            m.train_tokens, m.train_seconds, m.bytes_sent, m.bytes_received, score(m.global_robust_ppl, sender),
            score(m.local_robust_ppl, sender), norm=norm, serving_version=m.serving_version,
            serving_ppl=score(m.serving_ppl, sender),
        ))
        log.info("round %d: update from %s (%d samples, loss %.3f)", ctx.number, sender, update.num_samples,
                 m.train_loss)

    # --- the close -------------------------------------------------------------------------

    def close(self, ctx: RoundContext, enough: bool) -> None:
        if not enough:
            return
        record, fleet = ctx.record, self.fleet
        version = fleet.state.global_version + 1
        started = time.perf_counter()
        optimizer_state = fleet.strategy.optimizer.state_dict()  # (kept if the candidate is refused)
        try:
            result, typical = self._merge(ctx) if self.collect is None else self._merge_in_shares(ctx)
        except SharesMissing as exc:  # (nothing merged: its results go on into the next round)
            record.status, record.note = RoundStatus.FAILED, str(exc)
            log.error("round %d: %s; the global adapter stays at v%d", ctx.number, exc, fleet.state.global_version)
            return
        record.aggregation_s = time.perf_counter() - started
        record.truncation_error = result.truncation_error
        if result.truncation_error:
            log.info("round %d: the downlink bound cut %.2g of the merged update (relative Frobenius, worst layer)",
                     ctx.number, result.truncation_error)
        problem = self._check_global(result, typical)
        if problem is None:
            losses = [d.train_loss for d in record.devices if d.train_loss is not None]
            fleet.store.save_server_state(version, fleet.strategy.optimizer.state_dict())
            fleet.new_version(GlobalAdapter(version, ctx.number, fleet.state.model.fingerprint, fleet.state.adapter,
                                            result.tensors, result.merged),
                              fleet.state.global_version, fleet.state.strategy, (d.device_id for d in record.devices),
                              {"train_loss": sum(losses) / len(losses)} if losses else {})
            fleet.update(global_version=version)  # (saved with the round's close)
            record.new_version, record.status = version, RoundStatus.AGGREGATED
            return
        fleet.strategy.optimizer.load_state_dict(optimizer_state)
        contributors = ", ".join(sorted(d.device_id for d in record.devices))
        record.status = RoundStatus.REJECTED
        record.note = f"candidate v{version} not published: {problem}; contributors: {contributors}"
        log.error("round %d: %s; the global adapter stays at v%d", ctx.number, record.note, fleet.state.global_version)
        if self.metrics is not None:
            self.metrics.global_rejected()

    def keeps_journal(self, ctx: RoundContext) -> bool:
        """A failed round's results go on into the next train round."""
        return ctx.record.status is RoundStatus.FAILED

    def closed(self, ctx: RoundContext) -> None:
        self.forget_old_rounds()

    def round_start(self, number: int) -> RoundStart:
        state, adapter = self.fleet.state, self.fleet.global_adapter
        scale = self.fleet.kind.scale(state.adapter)
        return RoundStart(dict(adapter.tensors), dict(adapter.merged), scale, seed=self.config.seed + number)

    def _merge(self, ctx: RoundContext) -> tuple[NextGlobal, float]:
        """The round's accepted updates, streamed from the journal in device order (a round
        interrupted by restarts merges exactly what an uninterrupted one would, bit for bit)
        through the weighting, and the change a typical one (the lower median) would make
        alone: what ``guard.py`` measures the candidate global against."""
        state, kind = self.fleet.state, self.fleet.kind
        start = self.round_start(ctx.number)
        journaled = self.journal.load(ctx.number)
        paths = journaled.results if journaled is not None else {}
        names = sorted(paths)
        keys = [parse_name(name) for name in names]
        entries = [self._entries.get(key) or self._entry(paths[name]) for key, name in zip(keys, names)]
        merge = self.weighting.begin(self.fleet.strategy, start, entries, adapter_shapes(state.adapter, state.model))
        changes = merge.merge_all(lambda index: _journaled(paths[names[index]]).delta,
                                  lambda: kind.change_meter(start.tensors, start.scale))
        result = merge.finish()
        rows = {(d.device_id, d.from_round): d for d in ctx.record.devices}
        capped = []
        for key, entry, weight, share in zip(keys, entries, merge.weights, merge.shares):
            row = rows.get(key)
            if row is None:
                continue
            row.counted_samples = weight.samples if weight.samples < entry.samples else None
            row.norm_scale = weight.scale if weight.scale < 1.0 else None
            row.weight = share
            if row.counted_samples is not None or row.norm_scale:
                capped.append(row.device_id)
        if capped:
            log.info("round %d: influence bounded for %s (samples counted at most %s× the round's median, norms at most "
                     "%s× its median)", ctx.number, ", ".join(capped), self.config.influence.sample_ratio,
                     self.config.influence.norm_ratio)
        return result, lower_median(changes) if changes else 0.0

    def _merge_in_shares(self, ctx: RoundContext) -> tuple[NextGlobal, float]:
        """``_merge`` with workers: the plan of weights is made here from what each update's
        report said (samples, norm, lag); every worker merges the updates it holds, and the
        shares are added up here (``RoundMerge.absorb``): one merge of every update, to float64
        rounding (the sums are added in another order, so not bit for bit)."""
        from edgetune.wire.workers import MergeRequest

        from ..worker import join64

        start = self.round_start(ctx.number)
        journaled = self.journal.load(ctx.number)
        names = sorted(journaled.results if journaled is not None else {})
        keys = [parse_name(name) for name in names]
        entries = [self._entries.get(key) or self._reported(journaled.results[name]) for key, name in zip(keys, names)]
        weights = self.weighting.plan(entries)
        plan = {name: (w.scale, w.weight) for name, w in zip(names, weights)}
        holders = {name: self.holders[name] for name in names}
        request = MergeRequest(ctx.number, self.fleet.strategy.name, holders, plan, start.tensors, start.merged,
                               start.scale, start.seed, run_id=self.fleet.state.run_id)
        merge = self.fleet.strategy.begin(start)
        changes, missing, shares = [], [], 0
        for partial in self.collect(request, set(holders.values())):  # (added up one by one, in a fixed order)
            shares += 1
            missing += partial.missing
            if partial.scalars:
                merge.absorb(join64(partial.sums, partial.scalars))
            changes += list(partial.changes.values())
            del partial  # (let go before the next share is waited for)
        if missing or shares < len(set(holders.values())):
            missing.sort()
            raise SharesMissing(f"the workers holding {', '.join(sorted(set(holders.values())))} did not all send their "
                                f"share of the merge" + (f" (missing: {', '.join(missing[:5])})" if missing else ""))
        result = self.fleet.strategy.finish(merge)
        total = sum(w.weight for w in weights)
        rows = {(d.device_id, d.from_round): d for d in ctx.record.devices}
        for key, entry, weight in zip(keys, entries, weights):
            row = rows.get(key)
            if row is not None:
                row.counted_samples = weight.samples if weight.samples < entry.samples else None
                row.norm_scale = weight.scale if weight.scale < 1.0 else None
                row.weight = weight.weight / total if total > 0 else None
        return result, lower_median(changes) if changes else 0.0

    def _reported(self, record: JournalRecord) -> Entry:
        report = decode_message(record.read_bytes(), FILE_VERSIONS)
        update = report.update
        return Entry(update.num_samples, report.norm, self.fleet.state.global_version - update.base_version)

    def _entry(self, path: JournalRecord) -> Entry:
        """What the weighting needs of a journaled update the round did not record (its
        acceptance failed after it was journaled; the device resends it)."""
        update = _journaled(path)
        return Entry(update.num_samples, delta_norm(update.delta), self.fleet.state.global_version - update.base_version)

    def _check_global(self, result: NextGlobal, typical: float) -> str | None:
        """Why the round's candidate global must not be published (None: it may)."""
        state, adapter = self.fleet.state, self.fleet.global_adapter
        return check_candidate(self.fleet.kind, state.adapter, adapter_shapes(state.adapter, state.model),
                               (adapter.tensors, adapter.merged), (result.tensors, result.merged), typical,
                               self.config.max_global_change, self.config.server_optimizer)


class SharesMissing(RuntimeError):
    """Not every worker holding the round's updates sent its share of the merge in time."""


def _journaled(path: JournalRecord) -> Update:
    """An update as the journal keeps it (received bytes, checked when they came: any wire
    version this daemon ever took in)."""
    return unwrap(decode_message(path.read_bytes(), FILE_VERSIONS), FILE_VERSIONS)
