"""The table of message kinds (``edgetune.wire.kinds``): what is derived from it agrees with it,
and ``docs/protocol.md`` says what it says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from edgetune.wire import (
    AGGREGATOR_ID,
    AGGREGATOR_KINDS,
    BY_NAME,
    DEVICE_KINDS,
    DEVICE_TOPIC_KINDS,
    MESSAGE_KINDS,
    MUST_BE_SIGNED,
    RESULT_KINDS,
    TOPIC_KINDS,
    Address,
    Direction,
    Topics,
)

PROTOCOL = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
TOPICS = Topics("plant-7")
#: what follows ``…/{kind}`` in docs/protocol.md's topic column
_SHOWN = {Address.DEVICE: "/{device}", Address.FLEET: "", Address.CHUNKS: "/{i}", Address.BACKEND_CHUNKS: "/{backend}/{i}",
          Address.VERSION_CHUNKS: "/{version}/{i}"}


def example(kind, device: str = "line-1") -> str:
    """One concrete topic of ``kind`` in fleet plant-7."""
    tail = {Address.DEVICE: f"/{device}", Address.FLEET: "", Address.CHUNKS: "/0",
            Address.BACKEND_CHUNKS: "/ort/0", Address.VERSION_CHUNKS: "/7/0"}[kind.address]
    return f"{TOPICS.base}/{kind.name}{tail}"


def test_every_kind_carries_a_wire_message_and_names_are_unique():
    assert len(BY_NAME) == len(TOPIC_KINDS)
    assert all(kind.message in MESSAGE_KINDS.values() for kind in TOPIC_KINDS)
    assert all(kind.address is Address.DEVICE for kind in DEVICE_KINDS)  # (a device's ACL pins it to its own)
    assert set(DEVICE_KINDS) | set(AGGREGATOR_KINDS) == set(TOPIC_KINDS)
    assert DEVICE_TOPIC_KINDS == tuple(k.name for k in DEVICE_KINDS)
    assert RESULT_KINDS == {"update", "eval", "importance", "init", "personal", "serving_report"}
    assert all(kind.qos in (0, 1) for kind in TOPIC_KINDS)


def test_only_the_kinds_that_shape_the_fleet_must_be_signed():
    signed = {k.name for k in DEVICE_KINDS if k.signed}
    assert signed == {"hello", "update", "eval", "importance", "init", "personal", "error", "serving_report"}
    assert set(MUST_BE_SIGNED) == {BY_NAME[name].message for name in signed}
    assert all(BY_NAME[name].signed for name in RESULT_KINDS)  # a result is never unsigned in a keyed fleet


@pytest.mark.parametrize("kind", TOPIC_KINDS, ids=lambda k: k.name)
def test_each_topic_is_recognised_with_its_sender(kind):
    topic = example(kind)
    found = TOPICS.kind_of(topic)
    assert found is not None and found[0] is kind
    if kind.direction is Direction.UP:
        assert TOPICS.device_of(topic) == "line-1" and TOPICS.sender_of(topic) == "line-1"
    else:
        assert TOPICS.device_of(topic) is None and TOPICS.sender_of(topic) == AGGREGATOR_ID
    # a level too many or too few, an empty level, another fleet: not ours
    assert TOPICS.sender_of(topic + "/extra") is None
    assert TOPICS.sender_of(topic.replace("plant-7", "plant-8")) is None
    if kind.address is not Address.FLEET:
        assert TOPICS.sender_of(f"{TOPICS.base}/{kind.name}") is None
        assert TOPICS.sender_of(f"{TOPICS.base}/{kind.name}/") is None


def test_patterns_are_what_the_topic_helpers_build():
    assert BY_NAME["update"].pattern(TOPICS.base, "line-1") == TOPICS.update("line-1")
    assert BY_NAME["update"].pattern(TOPICS.base) == TOPICS.all_devices("update")
    assert BY_NAME["task"].pattern(TOPICS.base) == TOPICS.task
    assert BY_NAME["aggregator"].pattern(TOPICS.base) == TOPICS.aggregator_status
    assert BY_NAME["global"].pattern(TOPICS.base) == TOPICS.global_adapter + "/#"
    assert BY_NAME["artifacts"].pattern(TOPICS.base) == TOPICS.artifact_offer("#")
    assert BY_NAME["serving"].pattern(TOPICS.base) == TOPICS.serving
    assert BY_NAME["served"].pattern(TOPICS.base) == f"{TOPICS.base}/served/#"
    assert TOPICS.message_topic(TOPICS.served(7) + "/0") == TOPICS.served(7)
    assert BY_NAME["receipt"].pattern(TOPICS.base, "line-1") == TOPICS.receipt("line-1")
    assert BY_NAME["artifact_data"].pattern(TOPICS.base, "line-1") == TOPICS.artifact_data("line-1")


def _protocol_rows() -> dict[str, list[str]]:
    """docs/protocol.md's table of kinds: topic (as written there) -> the row's cells."""
    rows = {}
    for line in PROTOCOL.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and (m := re.fullmatch(r"`…/([^`]+)`", cells[2])):
            rows[m.group(1)] = cells
    return rows


@pytest.mark.parametrize("kind", TOPIC_KINDS, ids=lambda k: k.name)
def test_docs_protocol_lists_every_kind_as_the_table_has_it(kind):
    rows = _protocol_rows()
    shown = kind.name + _SHOWN[kind.address]
    assert shown in rows, f"docs/protocol.md has no row for …/{shown}"
    _, direction, _, delivery, _ = rows[shown]
    assert direction.startswith("device" if kind.direction is Direction.UP else "aggregator"), direction
    assert delivery.startswith(str(kind.qos)), delivery
    assert ("retained" in delivery) == kind.retained, delivery


def test_the_intake_limits_and_signing_rules_come_from_the_table():
    from edgetune_aggregator.intake import Intake

    intake = Intake(TOPICS)
    intake.result_limit, intake.hello_limit = 12345, 678
    assert intake.limit_of(TOPICS.update("line-1")) == intake.limit_of(TOPICS.init("line-1")) == 12345
    assert intake.limit_of(TOPICS.hello("line-1")) == 678
    assert intake.limit_of(TOPICS.importance("line-1")) == BY_NAME["importance"].max_bytes
    assert intake.limit_of(TOPICS.task) is None  # (the aggregator's own)
