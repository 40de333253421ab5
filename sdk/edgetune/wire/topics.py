"""Topic names of a fleet, and who may publish on each: ``edgetune/v1/{fleet}/{kind}[/…]``.
Which kinds exist and what each carries is the table in ``kinds.py``."""

from __future__ import annotations

from dataclasses import dataclass

from .kinds import BY_NAME, Address, Direction, TopicKind
from .names import check_name

__all__ = ["TOPIC_ROOT", "AGGREGATOR_ID", "Topics"]

TOPIC_ROOT = "edgetune/v1"
#: sender name of everything the aggregator publishes (devices have their own ids)
AGGREGATOR_ID = "aggregator"


@dataclass(frozen=True)
class Topics:
    """Topic names of one fleet: ``edgetune/v1/{fleet}/{kind}[/{device_id}]``.

    Device messages carry the device id as the last topic level, so a broker ACL can pin each
    client to its own topics (``edgetune-aggregator provision`` writes one section per device)
    and the daemon can check the sender.
    """

    fleet: str

    def __post_init__(self) -> None:
        check_name(self.fleet, "fleet name")

    @property
    def base(self) -> str:
        return f"{TOPIC_ROOT}/{self.fleet}"

    # aggregator -> devices (retained)
    @property
    def task(self) -> str:
        return f"{self.base}/task"

    @property
    def global_adapter(self) -> str:
        """Prefix of the retained chunks ``global/{index}`` of the current global adapter."""
        return f"{self.base}/global"

    def global_chunk(self, index: int) -> str:
        return f"{self.global_adapter}/{index}"

    @property
    def serving(self) -> str:
        """The retained ``Serving`` notice: which version the fleet serves."""
        return f"{self.base}/serving"

    def served(self, version: int) -> str:
        """Prefix of the retained chunks ``served/{version}/{index}`` of one served version."""
        return f"{self.base}/served/{version}"

    @property
    def aggregator_status(self) -> str:
        return f"{self.base}/aggregator"

    # device -> aggregator
    def hello(self, device_id: str) -> str:
        return f"{self.base}/hello/{device_id}"

    def presence(self, device_id: str) -> str:
        return f"{self.base}/presence/{device_id}"

    # --- the aggregator and its workers (edgetune.wire.workers) ---

    @property
    def workers_round(self) -> str:
        return f"{self.base}/workers/round"

    @property
    def workers_merge(self) -> str:
        return f"{self.base}/workers/merge"

    def worker_report(self, worker: str) -> str:
        return f"{self.base}/workers/{worker}/report"

    def worker_partial(self, worker: str) -> str:
        return f"{self.base}/workers/{worker}/partial"

    def update(self, device_id: str) -> str:
        return f"{self.base}/update/{device_id}"

    def eval(self, device_id: str) -> str:
        return f"{self.base}/eval/{device_id}"

    def importance(self, device_id: str) -> str:
        return f"{self.base}/importance/{device_id}"

    def init(self, device_id: str) -> str:
        return f"{self.base}/init/{device_id}"

    def personal(self, device_id: str) -> str:
        return f"{self.base}/personal/{device_id}"

    def progress(self, device_id: str) -> str:
        return f"{self.base}/progress/{device_id}"

    def error(self, device_id: str) -> str:
        return f"{self.base}/error/{device_id}"

    def artifact_request(self, device_id: str) -> str:
        return f"{self.base}/artifact_request/{device_id}"

    # aggregator -> devices: artifacts for devices without PyTorch
    def artifact_offer(self, backend: str) -> str:
        """Retained: what ``ArtifactOffer`` the aggregator serves for ``backend``."""
        return f"{self.base}/artifacts/{backend}"

    def artifact_data(self, device_id: str) -> str:
        """The bytes one device asked for (a device's ACL can allow it only its own)."""
        return f"{self.base}/artifact_data/{device_id}"

    def receipt(self, device_id: str) -> str:
        """The aggregator's receipts for one device's results (only that device reads them)."""
        return f"{self.base}/receipt/{device_id}"

    def refusal(self, device_id: str) -> str:
        """Why the aggregator will not serve one device (only that device reads it)."""
        return f"{self.base}/refusal/{device_id}"

    def of(self, kind: str, device_id: str) -> str:
        """The topic of one device's messages of ``kind`` (a name in ``kinds.py``)."""
        return BY_NAME[kind].pattern(self.base, device_id)

    def all_devices(self, kind: str) -> str:
        """Subscription filter for one device-message kind from every device."""
        return f"{self.base}/{kind}/+"

    def kind_of(self, topic: str) -> tuple[TopicKind, list[str]] | None:
        """The kind of one of this fleet's topics and the levels after the fleet's, or None if
        ``topic`` is not shaped as one of the kinds in ``kinds.py``."""
        prefix = self.base + "/"
        if not topic.startswith(prefix):
            return None
        parts = topic[len(prefix):].split("/")
        kind = BY_NAME.get(parts[0])
        if kind is None or len(parts) != _LEVELS[kind.address] or not all(parts):
            return None
        return kind, parts

    def message_topic(self, topic: str) -> str | None:
        """The topic a message on ``topic`` is signed for: the topic itself, or for a retained
        message in chunks the topic without the chunk index (it is signed once, whole); None
        if ``topic`` is not one of the fleet's."""
        found = self.kind_of(topic)
        if found is None:
            return None
        if found[0].address in (Address.CHUNKS, Address.BACKEND_CHUNKS, Address.VERSION_CHUNKS):
            return topic.rpartition("/")[0]
        return topic

    def device_kind(self, topic: str) -> TopicKind | None:
        """The kind of a device topic (``update`` of ``…/update/{device}``), None if not one."""
        found = self.kind_of(topic)
        return found[0] if found is not None and found[0].direction is Direction.UP else None

    def device_of(self, topic: str) -> str | None:
        """The device id a device topic names, or None if ``topic`` is not one."""
        found = self.kind_of(topic)
        if found is None or found[0].direction is not Direction.UP:
            return None
        return found[1][1]

    def sender_of(self, topic: str) -> str | None:
        """Who publishes on ``topic``: a device id, ``AGGREGATOR_ID``, or None if not ours."""
        found = self.kind_of(topic)
        if found is None:
            return None
        return found[1][1] if found[0].direction is Direction.UP else AGGREGATOR_ID


#: topic levels after the fleet's, per address shape
_LEVELS = {Address.FLEET: 1, Address.DEVICE: 2, Address.CHUNKS: 2, Address.BACKEND_CHUNKS: 3, Address.VERSION_CHUNKS: 3}
