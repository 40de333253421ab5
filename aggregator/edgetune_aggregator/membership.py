"""Who is in the fleet: hellos (admitted, of the fleet's model, able to train its adapter),
presence, the devices that answered a task, and who may send a large payload at all.

A hello is checked against the operator's admission list, the pinned model (fleet_model.py),
the adapter the fleet trains and the model the fleet already has; an accepted one is saved in
the state dir (or, on a full disk, as soon as there is room) so a restarted daemon knows its
devices. Only devices that said hello count for quorums, and only they may send results: the
network thread refuses a result from anyone else before decoding it (``admit_payload``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable

from edgetune.adapters.registry import adapter_shapes
from edgetune.logsafe import shown
from edgetune.transport.channel import Channel
from edgetune import __version__
from edgetune.wire import PEER_VERSIONS, Hello, Presence, Refusal, Topics
from edgetune.wire.manifest_file import mismatch

from .config import MAX_ADAPTER_PARAMETERS, AggregatorConfig
from .fleet import Fleet
from .fleet_model import pinned_model
from .health import Health
from .intake import Intake, hello_limit
from .strategies import STRATEGIES, ExactStrategy

log = logging.getLogger("edgetune_aggregator.daemon")

#: senders of hellos remembered on the network thread before the set starts afresh
_MAX_HEARD = 100_000


class Membership:
    def __init__(self, config: AggregatorConfig, fleet: Fleet, channel: Channel, topics: Topics, intake: Intake,
                 health: Health):
        self.config = config
        self.fleet = fleet
        self.channel = channel
        self.topics = topics
        self.intake = intake
        self.health = health
        self.devices: dict[str, Hello] = {}
        self.online: set[str] = set()
        #: devices that answered a task of this run (a result, or an error report saying why
        #: not): in an open fleet only they hold a round open (``RoundRunner.needed``)
        self.answered: dict[str, int] = {}  # device -> the round it first answered in
        #: the fleet's model, pinned by the operator (fleet_model.py); None: the first hello's
        self.pinned = pinned_model(config.model, config.model_from_first_hello)
        if self.pinned is not None:  # a hello is a manifest and a profile: no need for 8 MiB
            intake.hello_limit = hello_limit(self.pinned)
        #: ``(device)`` called when a device with a profile joins a started fleet (its plan)
        self.on_join: Callable[[str], None] | None = None
        #: ``(refusal)`` tells a device why its hello was refused (``Publisher.refuse``)
        self.on_refusal: Callable[[Refusal], None] | None = None
        #: ``(issued)``: the newest signed number an accepted device holds (the fleet key's count)
        self.on_issued: Callable[[int], None] | None = None
        self._heard: set[str] = set()  # senders of a hello the channel passed on (network thread)
        self._manifests: dict[str, object] = {}  # fingerprint -> the first manifest (see on_hello)
        self._unsaved: set[str] = set()  # devices whose hello could not be written yet (disk full)

    @property
    def open_fleet(self) -> bool:
        """Anyone who can publish may join: no device keys, no admission list."""
        return not self.intake.signed and self.config.admit is None

    def load(self) -> None:
        """The devices the state dir knows (those admitted under another pin, or no longer on
        the admission list, say hello again)."""
        devices = self.fleet.store.load_devices()
        if self.pinned is not None:
            devices = {d: h for d, h in devices.items() if mismatch(self.pinned, h.model) is None}
        if self.config.admit is not None:
            devices = {d: h for d, h in devices.items() if d in self.config.admit}
        self.devices = devices
        for hello in devices.values():
            self._manifests.setdefault(hello.model.fingerprint, hello.model)

    def known_answers(self, records: list[dict]) -> None:
        """Who answered in the rounds of ``rounds.json`` (a resumed daemon)."""
        for record in records:
            for device in [d["device_id"] for d in record["devices"]] + list(record.get("declined") or {}):
                self.answered.setdefault(device, record["round"])

    def answer(self, device: str, round_number: int) -> None:
        self.answered.setdefault(device, round_number)

    def reachable(self) -> set[str]:
        """Devices of the fleet that are online (those a task can reach)."""
        return self.online & set(self.devices)

    def save_unsaved(self) -> None:
        """Write the hellos a full disk held back (raises OSError if it still cannot)."""
        for device in sorted(self._unsaved):
            self.fleet.store.save_device(self.devices[device])
        self._unsaved.clear()

    # --- the network thread ---------------------------------------------------------------

    def admit_payload(self, sender: str, topic: str) -> tuple[str, str] | None:
        """(On the network thread.) A result (the large payloads) from a device the daemon
        has no hello from is refused before it is decoded or reassembled. Hellos, presence and
        error reports are small, and may overtake the hello on its way to the round loop; an
        artifact request comes before any hello (a device without PyTorch fetches first)."""
        kind = self.topics.device_kind(topic)
        if kind is not None and kind.name == "hello":  # (its result may come before the round loop has read the hello)
            if len(self._heard) >= _MAX_HEARD:
                self._heard.clear()
            self._heard.add(sender)
        if kind is None or not kind.result or sender in self.devices or sender in self._heard:
            return None
        return "unknown_device", "no hello received from it"

    # --- messages -------------------------------------------------------------------------

    def on_undecodable(self, sender: str, topic: str, reason: str, detail: str, payload: bytes) -> None:
        """(On the network thread.) A hello in a wire version the daemon does not read gets a
        refusal saying what to upgrade (a device on v1 reads no v2 at all, but its own log names
        every v2 task it drops). Not in a fleet with device keys: nothing tells who sent it."""
        kind = self.topics.device_kind(topic)
        if (reason != "schema_version" or kind is None or kind.name != "hello" or self.on_refusal is None
                or self.intake.signed or self.topics.device_of(topic) != sender):
            return
        upgrade = ("edgetune on the aggregator" if "upgrade this side" in detail
                   else f"edgetune on this device (the aggregator runs {__version__})")
        try:
            refusal = Refusal(sender, reason, detail[:1024], upgrade, hashlib.sha256(payload).hexdigest())
        except ValueError:  # (a topic level that is no device id: nobody to answer)
            return
        self.on_refusal(refusal)

    def on_presence(self, sender: str, presence: Presence) -> None:
        if sender not in self.devices:  # (it decides quorums: only the fleet's devices count)
            return
        (self.online.add if presence.online else self.online.discard)(sender)
        log.info("device %s is %s", shown(sender, 64), "online" if presence.online else "offline")

    def check_model(self, hello: Hello) -> str | None:
        """Why the fleet cannot train on this device's model (None if it can)."""
        state = self.fleet.state
        spec = state.adapter if state else self.config.adapter  # a resumed fleet keeps its own
        kind = spec.kind
        if kind not in hello.capabilities.adapters:
            return (f"the fleet trains {kind} adapters; this device trains only "
                    f"{', '.join(hello.capabilities.adapters) or 'none'} (with {', '.join(hello.capabilities.backends)})")
        try:
            shapes = adapter_shapes(spec, hello.model)
        except ValueError as exc:
            return str(exc)
        size = sum(a * b for a, b in shapes.values())
        if size > MAX_ADAPTER_PARAMETERS:
            return f"the adapter would have {size:,} parameters (at most {MAX_ADAPTER_PARAMETERS:,})"
        return None

    def check_wire(self, hello: Hello) -> tuple[str, str, str] | None:
        """``(reason, detail, upgrade)`` if this device cannot read what the fleet sends it (None if it
        can): a wire version in common, the fleet's delta precision, and the frozen merged
        delta of strategies that fold their aggregate into one. Serving it anyway would have it
        drop every message, or train a model other than the fleet's without knowing."""
        caps = hello.capabilities
        if not set(caps.wire) & set(PEER_VERSIONS):
            return ("schema_version", f"this device reads wire {'/'.join(f'v{v}' for v in caps.wire)}; "
                                      f"the aggregator writes {'/'.join(f'v{v}' for v in PEER_VERSIONS)}",
                    "edgetune on the aggregator" if min(caps.wire) > max(PEER_VERSIONS) else "")
        needed = self.config.downlink_precision
        if needed not in caps.precisions:
            return ("unsupported_precision", f"the fleet sends deltas as {needed}; this device reads "
                                             f"{', '.join(caps.precisions) or 'none'}", "")
        if not caps.merged_delta and self._uses_merged():
            return ("no_merged_delta", f"the fleet's strategy {self.config.strategy_name} folds its aggregate into a "
                                       "frozen merged delta, which this device does not apply: it would train on "
                                       "another model than the fleet's", "")
        return None

    def _uses_merged(self) -> bool:
        adapter = self.fleet.global_adapter
        if adapter is not None and adapter.merged:
            return True
        strategy = STRATEGIES.get(self.config.strategy_name)
        return strategy is not None and issubclass(strategy, ExactStrategy)

    def refuse(self, device: str, topic: str, reason: str, detail: str, upgrade: str = "", payload: bytes = b"") -> None:
        """Drop a hello (logged with its sender and reason, counted) and tell its device why;
        ``payload``: the hello as received, which the refusal names."""
        self.channel.drop(device, topic, reason, detail + (f"; upgrade {upgrade}" if upgrade else ""))
        if self.on_refusal is not None:
            self.on_refusal(Refusal(device, reason[:64], detail[:1024], upgrade[:256],
                                    hashlib.sha256(payload).hexdigest()))

    def on_hello(self, topic: str, hello: Hello, payload: bytes = b"") -> None:
        """``payload``: the hello as received (a refusal names it)."""
        device = hello.device_id

        def refuse(reason: str, detail: str, upgrade: str = "") -> None:
            self.refuse(device, topic, reason, detail, upgrade, payload)

        if self.config.admit is not None and device not in self.config.admit:
            refuse("not_admitted", "not on the fleet's --admit list")
            return
        wire = self.check_wire(hello)
        if wire:
            reason, detail, upgrade = wire
            refuse(reason, detail, upgrade or f"edgetune on this device (the aggregator runs {__version__})")
            return
        if self.pinned is not None:
            why = mismatch(self.pinned, hello.model)
            if why:
                refuse("model_mismatch", why)
                return
            if hello.model is not self.pinned:  # the operator's sizes, not the device's claims
                hello = dataclasses.replace(hello, model=self.pinned)
        why = self.check_model(hello)
        if why:
            refuse("bad_model", why)
            return
        why = self._model_mismatch(hello)
        if why:
            refuse("model_mismatch", why)
            return
        # One manifest object per model: a fleet's devices send the same one, and a copy per
        # device (hundreds of layers each) would make the daemon's memory grow with the fleet.
        known = self._manifests.setdefault(hello.model.fingerprint, hello.model)
        if known is not hello.model and known == hello.model:
            hello = dataclasses.replace(hello, model=known)
        new = hello.device_id not in self.devices
        if new:
            log.info("device %s joined (sdk %s, %d samples)", shown(hello.device_id, 64), shown(hello.sdk_version, 32),
                     hello.num_samples)
        if self.devices.get(hello.device_id) != hello:  # (retained hellos come again on every restart)
            self._save(hello)
        self.devices[hello.device_id] = hello
        self.online.add(hello.device_id)
        if hello.downlink_issued and self.on_issued is not None:
            self.on_issued(hello.downlink_issued)
        if new and hello.profile is not None and self.fleet.state is not None and self.on_join is not None:
            self.on_join(hello.device_id)

    def _model_mismatch(self, hello: Hello) -> str | None:
        """Why the hello's model is not the fleet's (or, before the fleet starts, not that of
        the devices already in), None if it is."""
        fleet_model = self.fleet.state.model if self.fleet.state else None
        if fleet_model and hello.model.fingerprint != fleet_model.fingerprint:
            return (f"model {hello.model.name} ({hello.model.fingerprint}) is not the "
                    f"fleet's {fleet_model.name} ({fleet_model.fingerprint})")
        if not fleet_model and self.devices:
            first = next(iter(self.devices.values())).model
            if hello.model.fingerprint != first.fingerprint:
                return f"model {hello.model.fingerprint} differs from {first.fingerprint}"
        return None

    def _save(self, hello: Hello) -> None:
        try:
            self.fleet.store.save_device(hello)
            self._unsaved.discard(hello.device_id)
        except OSError as exc:  # a full disk: it joins now, and is saved once there is room
            log.error("could not save %s's hello: %s", hello.device_id, exc)
            self._unsaved.add(hello.device_id)
            self.health.storage_failed(exc)
