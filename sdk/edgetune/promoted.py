"""The global version a device serves: the one the fleet promoted (or, on a staged rollout's
canary, its candidate), which need not be the newest one rounds train on.

The aggregator's retained ``serving`` notice names a version and its digest for each device
(``Serving.version_for``). The device takes that version's weights from the training global
adapter it holds when that is the same version with the same digest (nothing to download),
else from the version's own retained topic ``served/{version}``, and switches only when the
digest of what it received equals the notice's: a stale retained message, a mixed-up topic or
a bug cannot make it serve other weights than the notice names. (Against a hostile broker that
holds only with the fleet key, docs/security.md: the notice is then signed by the aggregator.
Without it, the notice is as trusted as the broker that carried it.) It keeps what it serves in its
state dir, so after a restart it serves the same weights before it hears from the fleet.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .adapters.digest import adapter_digest
from .atomic import atomic_write_bytes
from .transport import TransportError
from .wire import AGGREGATOR_ID, FILE_VERSIONS, GlobalAdapter, Serving, ServingReport, Topics, decode_message, encode_message

log = logging.getLogger("edgetune.device")

_FILE = "serving.msgpack"


class PromotedAdapter:
    """What one device serves of the fleet's versions, and what it waits for."""

    def __init__(self, device_id: str, state_dir: Path | None = None, fingerprint: str = ""):
        self.device_id = device_id
        self.state_dir = Path(state_dir) if state_dir is not None else None
        #: the base model's fingerprint: an adapter for another model is never served
        self.fingerprint = fingerprint
        #: the version served now (None: none promoted yet), and its digest
        self.adapter: GlobalAdapter | None = None
        self.digest = ""
        #: the version it served before (a staged rollout's canaries go back to it: no download)
        self.previous: GlobalAdapter | None = None
        #: ``(version, digest)`` the fleet's notice names for this device and it does not serve yet
        self.wanted: tuple[int, str] | None = None
        self.channel = None  # (attach: how it fetches versions and reports)
        self.topics: Topics | None = None
        self._enqueue = None
        self._served_filter: str | None = None  # the served/{version} topics it listens to
        #: ``(adapters) -> perplexities`` on this device's held-out text (the worker's ``score``)
        self.score = lambda adapters: [None] * len(adapters)
        self._canary = False  # the wanted version is a staged rollout's candidate, this device a canary
        self._load()

    def attach(self, channel, topics: Topics, enqueue, score=None) -> None:
        """The device's channel (to fetch a version and report), its topics, its inbox's
        ``enqueue`` (what arrives is handled on the device's one thread, like the rest), and how
        it scores adapters (a canary reports both versions' perplexity)."""
        self.channel, self.topics, self._enqueue = channel, topics, enqueue
        if score is not None:
            self.score = score

    @property
    def version(self) -> int | None:
        return self.adapter.version if self.adapter is not None else None

    def notice(self, serving: Serving) -> tuple[int, str] | None:
        """The fleet says what it serves: the ``(version, digest)`` this device must fetch, or
        None if it serves that already."""
        version, digest = serving.version_for(self.device_id)
        self._canary = serving.candidate is not None and version == serving.candidate
        if self.adapter is not None and (self.adapter.version, self.digest) == (version, digest):
            self.wanted = None
            return None
        self.wanted = (version, digest)
        return self.wanted

    def offer(self, adapter: GlobalAdapter) -> tuple[bool, str]:
        """An adapter that may be the wanted version: ``(switched, why not)``. Switches (and
        keeps it on disk) only if it is the wanted version, for this model, with its digest."""
        if self.wanted is None or adapter.version != self.wanted[0]:
            return False, "not_wanted"
        if self.fingerprint and adapter.model_fingerprint != self.fingerprint:
            return False, f"model_mismatch: for model {adapter.model_fingerprint}"
        digest = adapter_digest(adapter.tensors, adapter.merged)
        if digest != self.wanted[1]:
            return False, f"digest_mismatch: v{adapter.version} digests to {digest[:16]}…, the notice names " \
                          f"{self.wanted[1][:16]}…"
        self.previous, self.adapter, self.digest, self.wanted = self.adapter, adapter, digest, None
        self._save()
        return True, ""

    # --- on the device's thread -------------------------------------------------------------

    def on_notice(self, notice: Serving, held: GlobalAdapter | None) -> None:
        """The fleet's notice: serve its version for this device, from the training global
        ``held`` where that is it, else fetched from ``served/{version}``."""
        wanted = self.notice(notice)
        if wanted is None:
            if self._canary and self.adapter is not None:  # (a canary's report may not have reached the fleet:
                self._report(self.adapter, self.previous, True, "", True, self.digest)  # say it again)
            return self._listen_served(None)
        for have in (held, self.previous):  # (the training global, or what it served before: no download)
            if have is not None and have.version == wanted[0] and self._serve(have, downloaded=False):
                return None
        log.info("%s: the fleet serves v%d here: fetching it", self.device_id, wanted[0])
        return self._listen_served(wanted[0])

    def on_global(self, adapter: GlobalAdapter) -> None:
        """A new training global: the wanted version, maybe (no download then)."""
        if self.wanted is not None and self.wanted[0] == adapter.version:
            self._serve(adapter, downloaded=False)

    def on_served(self, adapter: GlobalAdapter) -> None:
        """A version from ``served/{version}``."""
        if self.wanted is not None and adapter.version == self.wanted[0]:
            self._serve(adapter, downloaded=True)

    def _listen_served(self, version: int | None) -> None:
        """Listen to ``served/{version}`` alone (None: to none)."""
        wanted = None if version is None else self.topics.served(version) + "/+"
        if wanted == self._served_filter:
            return
        if self._served_filter is not None and self.channel.unsubscribe(self._served_filter):
            self._served_filter = None
        if wanted is not None:
            self.channel.subscribe(wanted, self._enqueue)
            self._served_filter = wanted

    def _serve(self, adapter: GlobalAdapter, downloaded: bool) -> bool:
        """Switch to ``adapter`` if it is the wanted version, digest and all, and tell the fleet.
        A training global that differs (quantized on the way down) is no failure: the device
        fetches the version whole. A downloaded one that differs is refused, logged, counted."""
        me, wanted, previous, before, canary = self.device_id, self.wanted, self.version, self.adapter, self._canary
        switched, why = self.offer(adapter)
        if not switched and not downloaded:
            return False
        if switched:
            log.info("%s: serves global v%d now%s", me, adapter.version, "" if previous is None else f" (was v{previous})")
            self._listen_served(None)
        else:
            self.channel.drop(AGGREGATOR_ID, self.topics.served(adapter.version), why.split(":")[0], why)
        self._report(adapter, before, switched, why, canary, self.digest if switched else wanted[1])
        return switched

    def _report(self, adapter: GlobalAdapter, before: GlobalAdapter | None, switched: bool, why: str, canary: bool,
                digest: str) -> None:
        """Tell the fleet what it serves; a canary scores both versions on its held-out text."""
        me, previous = self.device_id, before.version if before is not None else None
        ppl = previous_ppl = None
        if switched and canary:  # (a canary's word decides whether everyone gets this version)
            try:
                scores = self.score([adapter, before] if before is not None else [adapter])
                ppl, previous_ppl = scores[0], (scores[1] if len(scores) > 1 else None)
            except Exception as exc:  # (reported unscored: it counts as switched, not as measured)
                log.warning("%s: could not score v%d for the staged rollout: %s", me, adapter.version, exc)
                why = f"not scored: {type(exc).__name__}: {exc}"
            else:
                log.info("%s: canary for v%d: held-out ppl %s (v%s: %s)", me, adapter.version, _shown(ppl), previous,
                         _shown(previous_ppl))
        report = ServingReport(me, adapter.version, digest, switched, "" if switched and not why else why[:256],
                               previous, ppl, previous_ppl)
        try:
            self.channel.send(self.topics.of("serving_report", me), report)
        except TransportError as exc:  # (the fleet hears what it serves at its next switch)
            log.warning("%s: could not report the version it serves: %s", me, exc)

    # --- the state dir ------------------------------------------------------------------------

    def _path(self) -> Path | None:
        return self.state_dir / _FILE if self.state_dir is not None else None

    def _save(self) -> None:
        path = self._path()
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, encode_message(self.adapter))
        except OSError as exc:  # it serves the version all the same; a restart falls back to the global
            log.warning("%s: could not keep the served version on disk: %s", self.device_id, exc)

    def _load(self) -> None:
        path = self._path()
        if path is None or not path.exists():
            return
        try:
            adapter = decode_message(path.read_bytes(), FILE_VERSIONS)
        except Exception as exc:  # (written atomically: only tampering or another format gets here)
            log.warning("%s: ignoring %s: %s", self.device_id, path, exc)
            return
        if not isinstance(adapter, GlobalAdapter) or (self.fingerprint and adapter.model_fingerprint != self.fingerprint):
            log.warning("%s: ignoring %s: not an adapter for this model", self.device_id, path)
            return
        self.adapter, self.digest = adapter, adapter_digest(adapter.tensors, adapter.merged)


def _shown(ppl: float | None) -> str:
    return "-" if ppl is None else f"{ppl:.2f}"
