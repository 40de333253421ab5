"""A model manifest as a JSON file: what ``edgetune manifest`` writes on a machine that has the
model, and what the aggregator's ``--model-manifest`` pins the fleet to.

Why a file: the daemon never loads models (numpy only), yet the fleet's model must be the
operator's choice, not whatever the first device to say hello claims (docs/security.md). The
file is small (a name, a fingerprint, one (out, in) pair per linear layer) and reviewable.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from .specs import ModelManifest

FORMAT = "edgetune-model-manifest/1"


def manifest_to_dict(manifest: ModelManifest) -> dict:
    return {"format": FORMAT, **asdict(manifest)}


def manifest_from_dict(raw: dict) -> ModelManifest:
    """The manifest in ``raw`` (JSON-shaped); ValueError says what is wrong with it."""
    if not isinstance(raw, dict):
        raise ValueError("a model manifest is a JSON object")
    fields = {k: v for k, v in raw.items() if k != "format"}
    if raw.get("format", FORMAT) != FORMAT:
        raise ValueError(f"format {raw.get('format')!r}; expected {FORMAT!r}")
    modules = fields.get("modules")
    if not isinstance(modules, dict):
        raise ValueError("'modules' must map layer names to [out_features, in_features]")
    try:
        fields["modules"] = {str(k): (int(v[0]), int(v[1])) for k, v in modules.items()}
        return ModelManifest(**fields)
    except (TypeError, IndexError) as exc:
        raise ValueError(f"not a model manifest: {exc}") from None


def read_manifest(path: Path) -> ModelManifest:
    try:
        return manifest_from_dict(json.loads(Path(path).read_text()))
    except (OSError, json.JSONDecodeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None


def write_manifest(path: Path, manifest: ModelManifest) -> None:
    from ..atomic import atomic_write_json

    atomic_write_json(Path(path), manifest_to_dict(manifest))


def mismatch(fleet: ModelManifest, claimed: ModelManifest) -> str | None:
    """Why a device claiming ``claimed`` cannot train in a fleet pinned to ``fleet`` (None: it
    can). The fingerprint and the layers decide the adapter's shapes; the name is a label."""
    if claimed.fingerprint != fleet.fingerprint:
        return (f"model fingerprint {claimed.fingerprint[:16]} is not the fleet's {fleet.fingerprint} "
                f"({fleet.name[:64]})")
    if claimed.modules != fleet.modules:
        differ = sorted(set(claimed.modules.items()) ^ set(fleet.modules.items()))
        return (f"the fingerprint is the fleet's but {len(differ)} layer shape(s) differ "
                f"(e.g. {str(differ[0][0])[:80]})")
    return None
