"""The one table of message kinds: for every topic kind of a fleet, the message it carries, who
publishes it, its QoS, whether it is retained, how large it may be, and whether a fleet with
keys accepts it only signed.

Everything that used to list kinds by hand is derived from here: the device topics
(``DEVICE_KINDS``), the daemon's subscriptions, the intake's topic-to-message check, size limits
and signing rules, which kinds are round results (refused from a device that never said hello),
who may publish on a topic (``Topics.sender_of``), and the broker ACL that
``edgetune-aggregator provision`` writes. ``docs/protocol.md`` has the same table for people; a
test keeps the two equal. A new kind is one row here (and its message class in ``messages.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .messages import (
    AdapterInit,
    ArtifactData,
    ArtifactOffer,
    ArtifactRequest,
    ErrorReport,
    EvalReport,
    GlobalAdapter,
    Hello,
    ImportanceReport,
    PersonalizationReport,
    Presence,
    Progress,
    Receipt,
    Refusal,
    RoundTask,
    Serving,
    ServingReport,
    Update,
)

__all__ = ["Direction", "Address", "Limit", "TopicKind", "TOPIC_KINDS", "BY_NAME", "DEVICE_KINDS", "AGGREGATOR_KINDS", "DEVICE_TOPIC_KINDS", "RESULT_KINDS", "MUST_BE_SIGNED", "DOWNLINK_SIGNED"]


class Direction(str, Enum):
    UP = "device → aggregator"
    DOWN = "aggregator → devices"


class Address(str, Enum):
    """What follows the kind in the topic: ``…/{kind}/{device}``, nothing, chunk indexes."""

    #: ``{kind}/{device_id}``: one device's (its ACL pins it to its own)
    DEVICE = "device"
    #: ``{kind}``: one topic for the fleet
    FLEET = "fleet"
    #: ``{kind}/{index}``: a retained message in chunks
    CHUNKS = "chunks"
    #: ``{kind}/{backend}/{index}``: one retained message in chunks per backend
    BACKEND_CHUNKS = "backend chunks"
    #: ``{kind}/{version}/{index}``: one retained message in chunks per version
    VERSION_CHUNKS = "version chunks"


class Limit(str, Enum):
    """Size limits that depend on the fleet rather than on the kind."""

    #: what an update of the fleet's adapter layout can need (set once the layout is known)
    RESULT = "result"
    #: what a hello for the fleet's pinned model can need (``intake.hello_limit``)
    HELLO = "hello"


@dataclass(frozen=True)
class TopicKind:
    #: the topic level after the fleet: ``edgetune/v1/{fleet}/{name}/…``
    name: str
    #: the one message class it carries (inside a ``Signed`` or ``Chunk``s where it applies)
    message: type
    direction: Direction
    address: Address
    qos: int = 1
    retained: bool = False
    #: payload bytes it may have (device kinds only): a number, or a limit of the fleet's
    max_bytes: int | Limit = 1 << 20
    #: device kinds: a fleet with keys accepts it only signed by its device; aggregator kinds:
    #: a device holding the fleet key accepts it only signed by the aggregator
    signed: bool = False
    #: a round result (or a report tied to the fleet's adapter): refused, before decoding, from a
    #: device that has not said hello
    result: bool = False
    #: the daemon subscribes to it (``progress`` is for dashboards and the demo)
    aggregator_reads: bool = True

    def pattern(self, base: str, device_id: str | None = None) -> str:
        """The topic (filter) of this kind under ``base``: one device's where it has one."""
        if self.address is Address.FLEET:
            return f"{base}/{self.name}"
        if self.address is Address.DEVICE:
            return f"{base}/{self.name}/{device_id or '+'}"
        return f"{base}/{self.name}/#"


_UP, _DOWN = Direction.UP, Direction.DOWN
#: every topic kind of a fleet, devices' first (the order ``docs/protocol.md`` lists them in)
TOPIC_KINDS: tuple[TopicKind, ...] = (
    TopicKind("hello", Hello, _UP, Address.DEVICE, retained=True, max_bytes=Limit.HELLO, signed=True),
    TopicKind("presence", Presence, _UP, Address.DEVICE, retained=True),
    TopicKind("update", Update, _UP, Address.DEVICE, max_bytes=Limit.RESULT, signed=True, result=True),
    TopicKind("eval", EvalReport, _UP, Address.DEVICE, signed=True, result=True),
    TopicKind("importance", ImportanceReport, _UP, Address.DEVICE, max_bytes=4 << 20, signed=True, result=True),
    TopicKind("init", AdapterInit, _UP, Address.DEVICE, max_bytes=Limit.RESULT, signed=True, result=True),
    TopicKind("personal", PersonalizationReport, _UP, Address.DEVICE, signed=True, result=True),
    TopicKind("progress", Progress, _UP, Address.DEVICE, qos=0, aggregator_reads=False),
    # (signed too: an error report ends a device's round early, so a forged one would make the
    # quorum stop waiting for it)
    TopicKind("error", ErrorReport, _UP, Address.DEVICE, signed=True),
    TopicKind("artifact_request", ArtifactRequest, _UP, Address.DEVICE),
    TopicKind("serving_report", ServingReport, _UP, Address.DEVICE, signed=True, result=True),
    TopicKind("task", RoundTask, _DOWN, Address.FLEET, retained=True, signed=True),
    TopicKind("global", GlobalAdapter, _DOWN, Address.CHUNKS, retained=True, signed=True),
    # (unsigned: its last will is written at connect time, and it changes no model)
    # what the fleet serves, and the versions it names (docs/operations.md)
    TopicKind("serving", Serving, _DOWN, Address.FLEET, retained=True, signed=True),
    TopicKind("served", GlobalAdapter, _DOWN, Address.VERSION_CHUNKS, retained=True, signed=True),
    TopicKind("aggregator", Presence, _DOWN, Address.FLEET, retained=True),
    TopicKind("artifacts", ArtifactOffer, _DOWN, Address.BACKEND_CHUNKS, retained=True, signed=True),
    # (signed like all the daemon sends with a fleet key, but not required: a device checks every
    # file against the SHA-256 in the signed offer's manifest)
    TopicKind("artifact_data", ArtifactData, _DOWN, Address.DEVICE),
    TopicKind("receipt", Receipt, _DOWN, Address.DEVICE, signed=True),
    TopicKind("refusal", Refusal, _DOWN, Address.DEVICE, signed=True),
)
BY_NAME: dict[str, TopicKind] = {kind.name: kind for kind in TOPIC_KINDS}
#: the kinds devices publish, each on ``{kind}/{device_id}``
DEVICE_KINDS: tuple[TopicKind, ...] = tuple(k for k in TOPIC_KINDS if k.direction is Direction.UP)
#: the kinds the aggregator publishes
AGGREGATOR_KINDS: tuple[TopicKind, ...] = tuple(k for k in TOPIC_KINDS if k.direction is Direction.DOWN)
#: names of the device kinds (the topic levels a device's ACL lets it write)
DEVICE_TOPIC_KINDS: tuple[str, ...] = tuple(k.name for k in DEVICE_KINDS)
#: names of the round-result kinds (``TopicKind.result``)
RESULT_KINDS: frozenset[str] = frozenset(k.name for k in DEVICE_KINDS if k.result)
#: message classes a fleet with keys accepts only signed
MUST_BE_SIGNED: tuple[type, ...] = tuple(k.message for k in DEVICE_KINDS if k.signed)
#: names of the aggregator kinds a device with the fleet key accepts only signed
DOWNLINK_SIGNED: frozenset[str] = frozenset(k.name for k in AGGREGATOR_KINDS if k.signed)
