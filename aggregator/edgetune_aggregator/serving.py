"""What the fleet serves: promotion, rollback, the retained ``serving`` notice, and what devices
report they serve (docs/operations.md).

Rounds build versions (``versions.py``); devices serve the one promoted. With ``promote =
"auto"`` each version is promoted once stored; with ``"manual"`` only the operator's
``edgetune-aggregator promote`` / ``rollback`` (``control.py``) move it. A rollback serves the
older version at once, and before the next round opens restarts training from a copy of it
(a new version number whose parent is the old version, with the server optimizer's state of
then), so the rounds that built on the bad version leave no trace in what follows.

Devices check each served version's digest and say what they serve (``ServingReport``); the
daemon keeps the latest word of each device in ``serving.json`` (written at most once a second:
a promotion in a fleet of thousands is thousands of reports).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

from edgetune.atomic import atomic_write_json
from edgetune.clock import Clock
from edgetune.logsafe import shown
from edgetune.wire import GlobalAdapter, Serving, ServingReport

from . import control
from .config import AggregatorConfig
from .fleet import Fleet
from .canary import canary_verdict, choose_canaries
from .gate import Score, judge
from .publisher import Publisher
from .store import RoundRecord, RoundStatus

log = logging.getLogger("edgetune_aggregator.daemon")

_POLL_S = 0.5
_SAVE_S = 1.0


class Rollout:
    def __init__(self, config: AggregatorConfig, fleet: Fleet, publisher: Publisher, clock: Clock, metrics=None,
                 devices=lambda reachable=True: {}):
        self.config = config
        #: ``(reachable) -> {device: Hello}``: the fleet's devices, or those reachable now (a staged
        #: rollout's canaries are chosen among them)
        self.devices = devices
        #: steps taken since the last round closed (promotions, canaries, rollbacks): the round log's
        self.steps: list[dict] = []
        #: the gate's server-side scorer (``[gate] validation_text``), loaded with the model
        self.validation = None
        gate = config.gate
        if gate.validation_text is not None:
            from .validation_text import ValidationText

            self.validation = ValidationText(gate.validation_text, gate.validation_model, gate.validation_blocks,
                                             gate.validation_seq_len)
        self.fleet = fleet
        self.publisher = publisher
        self.clock = clock
        self.metrics = metrics
        #: device -> its latest ServingReport, as a dict with when it came
        self.reports: dict[str, dict] = {}
        self._dirty = False
        self._polled = self._saved = float("-inf")
        self._load_reports()

    # --- what is served ---------------------------------------------------------------------

    def notice(self) -> Serving | None:
        state = self.fleet.state
        if state is None or state.serving_version is None:
            return None
        versions = self.fleet.versions
        serving = versions.get(state.serving_version)
        candidate = versions.get(state.candidate_version) if state.candidate_version is not None else None
        if serving is None:  # (its record is written before the state names it)
            return None
        return Serving(serving.version, serving.digest, candidate.version if candidate else None,
                       candidate.digest if candidate else "", tuple(state.canaries) if candidate else ())

    def publish(self) -> None:
        """The served versions (whole, float32) and the notice naming them, retained."""
        notice = self.notice()
        adapters: dict[int, GlobalAdapter] = {}
        if notice is not None:
            for version in {notice.version, *(() if notice.candidate is None else (notice.candidate,))}:
                adapters[version] = self._adapter(version)
        self.publisher.publish_serving(notice, adapters)
        if self.metrics is not None and notice is not None:
            self.metrics.serving_version(notice.version)

    def _adapter(self, version: int) -> GlobalAdapter:
        adapter = self.fleet.global_adapter
        if adapter is not None and adapter.version == version:
            return adapter
        return self.fleet.store.load_global(version)

    # --- changes ----------------------------------------------------------------------------

    def stored(self, version: int) -> None:
        """A round stored a new version: the gate judges it in the round that trains on it;
        with automatic promotion it is served then (at once without a gate, or while nothing
        is served yet: there is nothing to compare it with). A version built while a rollback
        waits to reset training belongs to the abandoned lineage: never served."""
        state = self.fleet.state
        if state.reset_to is not None:
            self.fleet.versions.noted(version, f"built on a lineage rolled back to v{state.reset_to}: not served")
            return
        if self.config.gate.enabled and state.serving_version is not None:
            self.fleet.update(save=True, awaiting=version)
        elif self.config.promote == "auto":
            self.promote(version, "automatic")

    def resumed(self) -> None:
        """After a restart: what a crash between a round's close and its aftermath left undone
        (a judged version to serve, a stored one the gate has yet to await)."""
        state = self.fleet.state
        if state.promote_next is not None:
            self.closed(None)
        record = self.fleet.versions.get(state.global_version)
        if (record is not None and record.gate is None and state.awaiting is None and state.reset_to is None
                and state.serving_version is not None and state.global_version > state.serving_version
                and record.strategy != "rollback" and "not served" not in record.note):
            self.stored(state.global_version)

    def judge(self, record: RoundRecord) -> None:
        """At a round's close, before its record and the state are written (the runner writes
        both; nothing here is saved): if it started from the version the gate awaits, decide on
        it from the devices' paired scores (``gate.py``). A refused version is never served, and
        training restarts from the serving version, as after a rollback. A version it passes is
        served once the close is on disk (``closed``)."""
        try:
            self._judge(record)
        finally:  # (what happened to what the fleet serves while the round was open, in its log)
            record.rollout, self.steps = record.rollout + self.steps, []

    def closed(self, record: RoundRecord | None) -> None:
        """The round's close is on disk: serve what the gate passed, take in what it stored."""
        state = self.fleet.state
        version = state.promote_next
        self.fleet.update(promote_next=None)  # (saved below, with what it led to)
        if version is not None and state.reset_to is None:
            self.promote(version, "automatic, gate " + ("passed" if self.fleet.versions.get(version).gate.get("passed")
                                                       else "could not judge"))
        if record is not None and record.status is RoundStatus.AGGREGATED and record.new_version is not None:
            self.stored(record.new_version)
        self.fleet.save()

    def _judge(self, record: RoundRecord) -> None:
        state = self.fleet.state
        candidate, serving = state.awaiting, state.serving_version
        if candidate is None or record.base_version != candidate or serving is None or state.reset_to is not None:
            return
        if record.status is RoundStatus.FAILED:  # (too few to decide on: the next round tries again)
            return
        scores = [Score(d.device_id, d.num_samples, d.global_ppl, d.serving_ppl) for d in record.devices
                  if d.from_round is None and d.serving_version == serving]
        server = None
        if self.validation is not None:  # (the aggregator's own text: validation_text.py)
            try:
                server = (self.validation.perplexity(self._adapter(candidate)),
                          self.validation.perplexity(self._adapter(serving)))
            except Exception:  # (a scorer that fails must not stop the fleet: the devices' word stands)
                log.exception("the validation gate could not score v%d on its validation text", candidate)
        verdict = judge(candidate, serving, scores, self.config.gate, server)
        record.gate = verdict.as_dict()
        self.fleet.versions.judged(candidate, record.gate)
        self.fleet.update(awaiting=None)  # (in memory: the runner saves the state with the round)
        if self.metrics is not None:
            self.metrics.gate_verdict(verdict.passed)
        if verdict.passed is False:
            log.error("the validation gate refuses v%d: %s; the fleet keeps serving v%d and trains from it again",
                      candidate, verdict.reason, serving)
            self.fleet.versions.noted(candidate, f"refused by the gate: {verdict.reason}")
            record.note = "; ".join(filter(None, (record.note, f"gate refused v{candidate}: {verdict.reason}")))
            self.fleet.update(reset_to=serving, reset_request=f"gate-{state.run_id}-v{candidate}")
            self._step("refused", candidate, verdict.reason, serving=serving)
            return
        log.info("the validation gate %s v%d: %s", "passes" if verdict.passed else "could not judge", candidate,
                 verdict.reason)
        if self.config.promote == "auto":
            self.fleet.update(promote_next=candidate)

    def promote(self, version: int, why: str, force: bool = True, canary: bool = True) -> str | None:
        """Serve ``version`` on every device, through the canaries first where the fleet has a
        staged rollout (``canary``); why not (None: done). ``force``: even if the validation gate
        refused it."""
        state = self.fleet.state
        if state is None:
            return "the fleet has not started"
        record = self.fleet.versions.get(version)
        if record is None:
            known = [r.version for r in self.fleet.versions.all()]
            return f"no version {version} (the fleet has {_ranges(known)})"
        if not force and record.gate and record.gate.get("passed") is False:
            return f"the validation gate refused v{version}: {record.gate.get('reason')} (promote --force serves it)"
        if state.serving_version == version and state.candidate_version is None:
            return None
        if canary and state.candidate_version is not None:  # (one staged rollout at a time)
            if version == state.serving_version:  # (the operator keeps what is served: the stage stops)
                self._step("rolled_back", state.candidate_version, why, canaries=list(state.canaries),
                           serving=version)
                self.fleet.versions.noted(state.candidate_version, f"staged rollout stopped ({why})")
                return self._serve_all(version, why, step="kept")
            if version != state.candidate_version:
                if state.queued is not None and state.queued > version:
                    return f"v{state.queued} already waits for the canaries of v{state.candidate_version}"
                self.fleet.update(save=True, queued=version)
                log.info("v%d waits for the canaries of v%d (%s)", version, state.candidate_version, why)
            return None
        if canary and state.serving_version is not None and state.serving_version != version:
            canaries = choose_canaries({d: h.labels for d, h in self.devices(True).items()
                                        if h.capabilities.serves_versions}, self.config.rollout, state.run_id, version)
            if canaries:
                return self._start_canaries(version, canaries, why)
        return self._serve_all(version, why)

    def _serve_all(self, version: int, why: str, step: str = "promoted", keep_queued: bool = False) -> None:
        state = self.fleet.state
        previous = state.serving_version
        self.fleet.update(save=True, serving_version=version, candidate_version=None, canaries=[],
                          queued=state.queued if keep_queued else None)
        self.fleet.versions.noted(version, f"served from {_now()} ({why})")
        self._step(step, version, why)
        log.info("the fleet serves v%d now (%s)%s", version, why, "" if previous is None else f"; it served v{previous}")
        self.publish()
        return None

    def _start_canaries(self, version: int, canaries: list[str], why: str) -> None:
        state = self.fleet.state
        self.fleet.update(save=True, candidate_version=version, canaries=canaries, canary_started=self.clock.time())
        self._step("canary", version, why, canaries=canaries)
        log.info("staged rollout of v%d (%s): %d canar%s serve it first (%s); the rest keep v%d", version, why,
                 len(canaries), "y" if len(canaries) == 1 else "ies", ", ".join(canaries[:8]), state.serving_version)
        self.publish()
        return None

    def _judge_canaries(self) -> None:
        """Once every canary reported (or the time is up): serve the candidate to all, or send
        the canaries back to the version they served."""
        state = self.fleet.state
        if state is None or state.candidate_version is None:
            return
        timed_out = self.clock.time() - state.canary_started > self.config.rollout.canary_timeout_s
        samples = {d: h.num_samples for d, h in self.devices(False).items()}
        fresh = {d: r for d, r in self.reports.items() if r.get("at", 0.0) >= state.canary_started}
        verdict = canary_verdict(state.candidate_version, state.serving_version, state.canaries, fresh,
                                 samples, self.config.rollout, timed_out)
        if verdict is None:
            return
        candidate, serving = state.candidate_version, state.serving_version
        self.fleet.versions.measured(candidate, **({"canary_ppl": verdict.candidate_ppl} if verdict.candidate_ppl else {}))
        if self.metrics is not None:
            self.metrics.canary_verdict(verdict.passed)
        queued = state.queued
        if verdict.passed:
            log.info("the canaries pass v%d: %s", candidate, verdict.reason)
            self._serve_all(candidate, f"canaries passed: {verdict.reason}", keep_queued=True)
        else:
            log.error("the canaries fail v%d: %s; they go back to v%d", candidate, verdict.reason, serving)
            self.fleet.versions.noted(candidate, f"canaries failed: {verdict.reason}")
            self.fleet.update(save=True, candidate_version=None, canaries=[])
            self._step("rolled_back", candidate, verdict.reason, canaries=list(state.canaries), serving=serving)
            self.publish()
        if queued is not None:  # (staged now; a promote's own checks apply)
            self.fleet.update(save=True, queued=None)
            problem = self.promote(queued, f"queued behind the canaries of v{candidate}")
            if problem:
                log.warning("v%d, queued, is not staged: %s", queued, problem)

    def _step(self, step: str, version: int, why: str, **more) -> None:
        self.steps.append({"step": step, "version": version, "why": why, "at": self.clock.time(), **more})

    def rollback(self, version: int, request: str = "", why: str = "rollback") -> str | None:
        """Serve ``version`` at once, and train from it again before the next round opens."""
        problem = self.promote(version, why, canary=False)  # (back to a version served before: no canaries)
        if problem is None:
            self.fleet.update(save=True, reset_to=version, reset_request=request)
        return problem

    def reset_training(self, on_reset) -> None:
        """A rollback's training part, between rounds: the next version is a copy of the old
        one (parent: the old one) with its server optimizer state, and what was counted toward
        the versions after it is forgotten (``on_reset``)."""
        state, fleet = self.fleet.state, self.fleet
        if state.reset_to is None:
            return
        target, request = state.reset_to, state.reset_request
        made = fleet.versions.by_request(request)
        if made is None:  # (a daemon killed after the copy was stored finds it made)
            old = fleet.store.load_global(target)
            version = state.global_version + 1
            adapter = dataclasses.replace(old, version=version, round=state.round)
            fleet.store.save_server_state(version, fleet.store.load_server_state(target))
            fleet.new_version(adapter, target, "rollback", note=f"rollback to v{target}", request=request)
            made = fleet.versions.get(version)
        else:
            fleet.global_adapter = fleet.store.load_global(made.version)
        fleet.strategy.optimizer.load_state_dict(fleet.store.load_server_state(made.version))
        fleet.update(save=True, global_version=made.version, reset_to=None, reset_request="", awaiting=None,
                     lineage_round=state.round + 1)
        on_reset()
        log.info("training restarts from v%d as v%d (rollback)", target, made.version)
        self.publisher.publish_global()

    # --- the operator's requests and the devices' reports -----------------------------------------

    def check_model(self) -> None:
        """The gate's validation model must be the fleet's (raises ``ValueError`` saying so)."""
        if self.validation is not None and self.fleet.state is not None:
            self.validation.check_model(self.fleet.state.model)

    def tick(self) -> None:
        now = self.clock.monotonic()
        if now - self._polled >= _POLL_S:
            self._polled = now
            self.apply_requests()
            self._judge_canaries()
        if self._dirty and now - self._saved >= _SAVE_S:
            self._saved = now
            self._save_reports()

    def apply_requests(self) -> None:
        if self.fleet.state is None:  # (applied once the fleet has started)
            return
        for path, request in control.pending(self.config.state_dir):
            if isinstance(request, str):
                log.error("ignoring operator request %s: %s", path.name, request)
            else:
                why = f"{request.action} by the operator" + (f": {request.reason}" if request.reason else "")
                state = self.fleet.state
                if request.action == "promote":
                    problem = self.promote(request.version, why, force=request.force)
                elif self.fleet.versions.by_request(request.id) or state.reset_request == request.id:
                    problem = None  # (applied before a restart; its copy is made or waits for the next round)
                else:
                    problem = self.rollback(request.version, request.id, why)
                if problem:
                    log.error("operator request to %s v%d refused: %s", request.action, request.version, problem)
            control.done(path)

    def on_report(self, report: ServingReport) -> None:
        if report.device_id not in self.devices(False):  # (a member's word only: the file follows the fleet)
            return
        self.reports[report.device_id] = {**dataclasses.asdict(report), "at": self.clock.time()}
        self._dirty = True
        if report.switched:
            log.info("%s serves v%d", report.device_id, report.version)
        else:
            log.warning("%s does not serve v%d: %s", report.device_id, report.version, shown(report.reason, 256))
        if self.metrics is not None:
            self.metrics.serving_report(report.switched)
        state = self.fleet.state
        if state is not None and report.device_id in state.canaries and report.version == state.candidate_version:
            self._save_reports()  # (a canary's word decides: on disk before it counts)
            self._judge_canaries()

    def serving_counts(self) -> dict[int, int]:
        """version -> devices that said they serve it (their latest word)."""
        return serving_counts(self.reports)

    def _path(self):
        return reports_path(self.config.state_dir)

    def _save_reports(self) -> None:
        try:
            atomic_write_json(self._path(), {"format": 1, "devices": self.reports})
            self._dirty = False
        except OSError as exc:  # (kept in memory; tried again in a second)
            log.warning("could not record what devices serve: %s", exc)

    def _load_reports(self) -> None:
        self.reports = read_reports(self.config.state_dir)

    def close(self) -> None:
        if self._dirty:
            self._save_reports()


def reports_path(state_dir) -> Path:
    """``serving.json``: each device's latest ``ServingReport`` (as a dict, with when it came)."""
    return Path(state_dir) / "serving.json"


def read_reports(state_dir) -> dict[str, dict]:
    """What ``serving.json`` holds ({} if nothing, or nothing readable: it is rewritten)."""
    path = reports_path(state_dir)
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:  # (written atomically: tampering or a bad disk)
        log.warning("ignoring %s: %s", path, exc)
        return {}
    if not (isinstance(saved, dict) and isinstance(saved.get("devices"), dict)):
        return {}
    return {d: e for d, e in saved["devices"].items() if isinstance(e, dict)}


def serving_counts(reports: dict[str, dict]) -> dict[int, int]:
    """version -> devices whose latest report says they serve it."""
    counts: dict[int, int] = {}
    for entry in reports.values():
        if entry.get("switched"):
            counts[entry["version"]] = counts.get(entry["version"], 0) + 1
    return counts


def _ranges(versions: list[int]) -> str:
    if not versions:
        return "none"
    return f"v{versions[0]}–v{versions[-1]}" if len(versions) > 1 else f"v{versions[0]}"


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
