"""The validation gate (docs/operations.md): a version is served only if the devices' paired
scores show no regression past the thresholds. The verdicts are computed here independently;
then a fleet of real tiny Llama devices over Mosquitto has a round poisoned (two of its three
devices train adversarially that round, to raise the loss on their text, within every bound on
updates: one such device alone is held back by the influence bounds), and the gate keeps that
round's version from ever being served.
"""

from __future__ import annotations

import uuid

import pytest

from edgetune_aggregator.gate import GateSettings, Score, judge

from helpers.fleet import fleet_config, start_aggregator, start_device, stop_fleet
from helpers.poison import AscendingWorker
from helpers.waiting import wait_for

# --- the verdicts ------------------------------------------------------------------------------


def test_the_fleet_regression_is_sample_weighted_and_paired():
    scores = [Score("a", 30, candidate=11.0, serving=10.0), Score("b", 10, candidate=19.0, serving=20.0)]
    # (30·11 + 10·19) / (30·10 + 10·20) = 520 / 500: +4 %
    verdict = judge(5, 4, scores, GateSettings(max_regression=0.05))
    assert verdict.passed is True and verdict.candidate_ppl == pytest.approx(13.0)
    assert verdict.devices == pytest.approx({"a": 0.1, "b": -0.05})
    refused = judge(5, 4, scores, GateSettings(max_regression=0.03))
    assert refused.passed is False and "+4.0%" in refused.reason


def test_a_device_beyond_its_own_threshold_refuses_the_version():
    scores = [Score("a", 10, 10.5, 10.0), Score("b", 10, 9.0, 10.0)]  # fleet: -2.5 %; a: +5 %
    assert judge(2, 1, scores, GateSettings(max_device_regression=0.1)).passed is True
    verdict = judge(2, 1, scores, GateSettings(max_device_regression=0.04))
    assert verdict.passed is False and verdict.reason.startswith("a's rose +5.0%")
    # its own threshold, over the fleet's per-device one
    assert judge(2, 1, scores, GateSettings(max_device_regression=0.04, device_thresholds={"a": 0.06})).passed


def test_without_enough_paired_scores_there_is_no_verdict():
    scores = [Score("a", 10, float("nan"), 10.0), Score("b", 0, 9.0, 10.0), Score("c", 10, 9.0, 10.0)]
    assert judge(2, 1, scores, GateSettings(min_reports=2)).passed is None
    assert judge(2, 1, [], GateSettings()).passed is None
    assert judge(2, 1, scores, GateSettings(min_reports=1)).reports == 1
    with pytest.raises(ValueError, match="max_regression"):
        GateSettings(max_regression=-0.1)
    assert not GateSettings(max_regression=None).enabled


# --- a poisoned round over Mosquitto ------------------------------------------------------------

POISONED_ROUND = AscendingWorker.poisoned_round
#: a site whose two devices were fed bad text that round: more than the influence bounds can tell apart
POISONERS = (1, 2)


def test_the_gate_stops_a_poisoned_round_over_mosquitto(mosquitto_url, tmp_path):
    fleet = f"gate-{uuid.uuid4().hex[:6]}"
    # (the operator's threshold: 2 %; honest rounds here move the fleet's perplexity between −9 % and
    # +0.1 %, the poisoned one by about +6 %)
    config = fleet_config(tmp_path, fleet, rounds=5, planning=False, gate=GateSettings(max_regression=0.02))
    aggregator, thread = start_aggregator(mosquitto_url, config)
    devices = [start_device(mosquitto_url, fleet, i, AscendingWorker if i in POISONERS else None, exit_when_finished=False)
               for i in range(3)]
    served = set()
    try:
        while not aggregator.finished.wait(0.2):  # (what the fleet served, as it went)
            if aggregator.state is not None and aggregator.state.serving_version is not None:
                served.add(aggregator.state.serving_version)
        assert wait_for(lambda: all(d.promoted.version == aggregator.state.serving_version for d in devices), 30)
    finally:
        stop_fleet(aggregator, thread, devices)
    versions = {r.version: r for r in aggregator.fleet.versions.all()}
    poisoned = versions[POISONED_ROUND]  # (round r builds version r until the gate steps in)
    assert poisoned.gate["passed"] is False, poisoned.gate
    assert "perplexity rose" in poisoned.gate["reason"]
    rounds = {r["round"]: r for r in aggregator.store.rounds() if r["kind"] == "train"}
    assert rounds[POISONED_ROUND + 1]["gate"]["candidate"] == POISONED_ROUND
    assert "gate refused" in rounds[POISONED_ROUND + 1]["note"]
    # honest versions before it passed; it and what was built on it were never served
    assert versions[1].gate["passed"] is True
    assert POISONED_ROUND not in served and POISONED_ROUND + 1 not in served and 1 in served
    # training restarted from the serving version: a copy of v1, and the versions after it from that
    copy = next(r for r in versions.values() if r.strategy == "rollback")
    assert (copy.parent, copy.digest) == (1, versions[1].digest)
    later = [r for r in versions.values() if r.version > copy.version]
    assert later and later[0].parent == copy.version
    assert all(r.gate is None or r.gate["passed"] is not False for r in later)
    # every device serves what the fleet serves, the version on disk
    final = versions[aggregator.state.serving_version]
    assert final.version > copy.version and all(d.promoted.digest == final.digest for d in devices)


def test_the_aggregator_own_validation_text_stops_it_when_devices_do_not_score(mosquitto_url, tmp_path):
    """The same poisoned round with devices scoring nothing (``eval_blocks = 0``): the gate
    judges on the text the operator gave the aggregator, with the fleet's model loaded there."""
    from edgetune.data import generate_device_texts
    from edgetune.wire import TrainSettings

    from helpers.fleet import TRAIN

    fleet = f"gate-text-{uuid.uuid4().hex[:6]}"
    text = tmp_path / "validation.txt"
    text.write_text("\n".join(generate_device_texts(9, 40)) + "\n")  # (another site's text, as an operator's sample)
    gate = GateSettings(max_regression=0.02, validation_text=text, validation_model="tiny-llama", validation_blocks=16,
                        validation_seq_len=32)
    config = fleet_config(tmp_path, fleet, rounds=4, planning=False, gate=gate,
                          train=TrainSettings(**{**TRAIN.__dict__, "eval_blocks": 0}))
    aggregator, thread = start_aggregator(mosquitto_url, config)
    devices = [start_device(mosquitto_url, fleet, i, AscendingWorker if i in POISONERS else None, exit_when_finished=False)
               for i in range(3)]
    try:
        assert aggregator.finished.wait(180)
    finally:
        stop_fleet(aggregator, thread, devices)
    versions = {r.version: r for r in aggregator.fleet.versions.all()}
    assert versions[1].gate["passed"] is True and versions[1].gate["reports"] == 0 and versions[1].gate["server"]
    poisoned = versions[POISONED_ROUND].gate
    assert poisoned["passed"] is False and "aggregator's validation text" in poisoned["reason"], poisoned
    assert any(r.strategy == "rollback" and r.parent == 1 for r in versions.values())
