"""`edgetune manifest` writes what the aggregator's --model-manifest reads, for a real model."""

from __future__ import annotations

import json

import pytest

from edgetune.models import load_model
from edgetune.wire.manifest_file import manifest_from_dict, mismatch, read_manifest

from helpers.commands import run_python


def test_the_manifest_command_writes_what_the_daemon_pins(tmp_path):
    path = tmp_path / "model.json"
    result = run_python("-m", "edgetune", "manifest", "--model", "tiny-llama", "--out", str(path))
    assert result.returncode == 0, result.stderr
    written = read_manifest(path)
    assert written == load_model("tiny-llama").manifest  # exactly what a device says in its hello

    from edgetune_aggregator.cli import build_parser, config_from_args

    args = build_parser().parse_args(["serve", "--broker", "mqtt://h:1", "--fleet", "f", "--state-dir",
                                      str(tmp_path / "s"), "--model-manifest", str(path)])
    assert config_from_args(args).model == written


def test_a_broken_manifest_file_says_what_is_wrong(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"name": "x", "fingerprint": "y", "modules": {"a": [0, 4]}}))
    with pytest.raises(ValueError, match="bad.json.*dimensions"):
        read_manifest(path)
    with pytest.raises(ValueError, match="format"):
        manifest_from_dict({"format": "something-else/9", "modules": {}})
    good = manifest_from_dict({"name": "m", "fingerprint": "f", "modules": {"l": [2, 3]}})
    assert mismatch(good, good) is None
    assert "fingerprint" in mismatch(good, manifest_from_dict({"name": "m", "fingerprint": "g", "modules": {}}))
    assert "layer shape" in mismatch(good, manifest_from_dict({"name": "m", "fingerprint": "f", "modules": {"l": [3, 3]}}))
