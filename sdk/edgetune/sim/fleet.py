"""A simulated fleet, described in YAML: which device classes, how many of each, whose text,
and how the aggregator runs the rounds. ``docs/simulation.md`` has the whole schema; a sketch::

    name: mixed-fleet
    model: default                 # the SmolLM2-135M GGUF, a model folder, or tiny-llama
    rounds: 10
    deadline_s: 30                 # the round timeout: slow devices really miss rounds
    adapter: {rank: 8, alpha: 16, targets: [q_proj, v_proj]}
    train: {steps: 8, batch_size: 4, seq_len: 128, lr: 0.001, eval_blocks: 4}
    aggregator: {strategy: auto, plan: auto, layout: fixed}
    devices:
      - class: raspberry-pi-4-4gb-gateway      # a profile in profiles/, or a path to one
        count: 2
        data: [fortunes:computers, fortunes:science]   # one source per device

A data source is ``fortunes:CATEGORY`` (Debian's fortunes), a ``.txt``/``.jsonl`` file (relative
to the fleet file), or ``generated`` (the demo's synthetic maintenance logs). Unknown keys are
warned about; a wrong value is a :class:`FleetError` naming the key.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..wire import DeviceProfile, check_name

log = logging.getLogger(__name__)

#: the repository's profiles/ (present in a checkout; an installed wheel has none)
PROFILES = Path(__file__).resolve().parents[3] / "profiles"

_TOP = ("name", "model", "rounds", "deadline_s", "seed", "adapter", "train", "aggregator", "data", "devices")
_AGGREGATOR = ("strategy", "plan", "planning", "layout", "server_optimizer", "server_lr", "server_momentum",
               "min_devices", "quorum", "evaluate_final", "merged_rank", "max_staleness", "calibration_batches")
_TRAIN = ("steps", "batch_size", "seq_len", "lr", "eval_blocks", "grad_accum")
_ADAPTER = ("rank", "alpha", "targets")
_DEVICE = ("class", "count", "name", "data", "uplink_mbps", "downlink_mbps")


class FleetError(ValueError):
    """The fleet file cannot be used; the message says which key and why."""


@dataclass(frozen=True)
class SimDevice:
    """One simulated device: its id, its class's profile, and where its text comes from."""

    device_id: str
    profile: DeviceProfile
    data: str


@dataclass(frozen=True)
class FleetSpec:
    name: str
    devices: tuple[SimDevice, ...]
    model: str | None = None
    rounds: int = 10
    deadline_s: float = 60.0
    seed: int = 0
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    steps: int = 8
    batch_size: int = 4
    seq_len: int = 128
    learning_rate: float = 1e-3
    eval_blocks: int = 4
    grad_accum: int = 1
    heldout: float = 0.1
    #: generated records per device (data: generated)
    records: int = 200
    #: AggregatorConfig overrides (strategy, plan, layout, ...)
    aggregator: dict[str, Any] = field(default_factory=dict)
    #: where relative data paths are read from
    root: Path = Path(".")


def load_fleet(path: str | Path) -> FleetSpec:
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise FleetError(f"{path}: cannot read the fleet file: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise FleetError(f"{path}: not valid YAML: {exc}") from None
    return fleet_from_dict(raw, path.parent, str(path))


def fleet_from_dict(raw: Any, root: Path = Path("."), where: str = "fleet") -> FleetSpec:
    if not isinstance(raw, dict):
        raise FleetError(f"{where}: expected a mapping with {', '.join(_TOP)}")
    _warn_unknown(raw, _TOP, where)
    adapter = _section(raw, "adapter", _ADAPTER, where)
    train = _section(raw, "train", _TRAIN, where)
    aggregator = _section(raw, "aggregator", _AGGREGATOR, where)
    data = _section(raw, "data", ("heldout", "records"), where)
    devices = raw.get("devices")
    if not isinstance(devices, list) or not devices:
        raise FleetError(f"{where}: 'devices' must be a non-empty list of {{class, count, data}}")
    sims: list[SimDevice] = []
    for index, group in enumerate(devices):
        sims.extend(_group(group, index, root, f"{where}: devices[{index}]"))
    ids = [d.device_id for d in sims]
    if len(set(ids)) != len(ids):
        raise FleetError(f"{where}: device ids repeat: {sorted({i for i in ids if ids.count(i) > 1})}")
    try:
        spec = FleetSpec(
            name=check_name(str(raw.get("name", "simulated")), "fleet name"),
            devices=tuple(sims),
            model=None if raw.get("model") in (None, "default") else str(raw["model"]),
            rounds=_int(raw.get("rounds", 10), "rounds", 1),
            deadline_s=_float(raw.get("deadline_s", 60.0), "deadline_s"),
            seed=_int(raw.get("seed", 0), "seed", 0),
            rank=_int(adapter.get("rank", 8), "adapter.rank", 1),
            alpha=_float(adapter.get("alpha", 16.0), "adapter.alpha"),
            targets=tuple(adapter.get("targets", ("q_proj", "v_proj"))),
            steps=_int(train.get("steps", 8), "train.steps", 1),
            batch_size=_int(train.get("batch_size", 4), "train.batch_size", 1),
            seq_len=_int(train.get("seq_len", 128), "train.seq_len", 2),
            learning_rate=_float(train.get("lr", 1e-3), "train.lr"),
            eval_blocks=_int(train.get("eval_blocks", 4), "train.eval_blocks", 0),
            grad_accum=_int(train.get("grad_accum", 1), "train.grad_accum", 1),
            heldout=_float(data.get("heldout", 0.1), "data.heldout"),
            records=_int(data.get("records", 200), "data.records", 10),
            aggregator=dict(aggregator),
            root=root,
        )
    except ValueError as exc:
        raise FleetError(f"{where}: {exc}") from None
    if not 0 < spec.heldout < 1:
        raise FleetError(f"{where}: data.heldout must be between 0 and 1, got {spec.heldout}")
    return spec


def find_profile(name: str, root: Path) -> DeviceProfile:
    """A device class: a profile file (relative to the fleet file) or a name in profiles/."""
    from ..profiling import load_profile

    for candidate in (root / name, root / f"{name}.yaml", PROFILES / f"{name}.yaml", Path("profiles") / f"{name}.yaml"):
        if candidate.is_file():
            return load_profile(candidate)
    known = sorted(p.stem for p in PROFILES.glob("*.yaml")) if PROFILES.is_dir() else []
    raise FleetError(f"no device class {name!r}: give a profile file or one of {', '.join(known) or 'profiles/*.yaml'}")


def _group(group: Any, index: int, root: Path, where: str) -> list[SimDevice]:
    import dataclasses

    if not isinstance(group, dict) or "class" not in group:
        raise FleetError(f"{where}: expected {{class: NAME, count: N, data: [...]}}")
    _warn_unknown(group, _DEVICE, where)
    profile = find_profile(str(group["class"]), root)
    for key in ("uplink_mbps", "downlink_mbps"):
        if group.get(key) is not None:
            profile = dataclasses.replace(profile, **{key: _float(group[key], f"{where}.{key}")})
    count = _int(group.get("count", 1), f"{where}.count", 1)
    data = group.get("data", "generated")
    sources = data if isinstance(data, list) else [data] * count
    if len(sources) != count or not all(isinstance(s, str) for s in sources):
        raise FleetError(f"{where}: 'data' must be one source or a list of {count} (one per device), got {data!r}")
    prefix = str(group.get("name") or profile.name)
    ids = [prefix] if count == 1 and group.get("name") else [f"{prefix}-{i + 1}" for i in range(count)]
    out = []
    for device_id, source in zip(ids, sources):
        try:
            check_name(device_id, "device id")
        except ValueError as exc:
            raise FleetError(f"{where}: {exc}") from None
        out.append(SimDevice(device_id, profile, source))
    return out


def _section(raw: dict, key: str, known: tuple[str, ...], where: str) -> dict:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise FleetError(f"{where}: '{key}' must be a mapping of {', '.join(known)}")
    _warn_unknown(value, known, f"{where}: {key}")
    return value


def _warn_unknown(raw: dict, known: tuple[str, ...], where: str) -> None:
    for key in raw:
        if key not in known:
            log.warning("%s: ignoring unknown key %r (known: %s)", where, key, ", ".join(known))


def _int(value: Any, name: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise FleetError(f"'{name}' must be a whole number ≥ {least}, got {value!r}")
    return value


def _float(value: Any, name: str) -> float:
    import math

    try:
        number = float(value)
    except (TypeError, ValueError):
        raise FleetError(f"'{name}' must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(number) or number <= 0:
        raise FleetError(f"'{name}' must be a number > 0, got {value!r}")
    return number


__all__ = ["FleetError", "FleetSpec", "SimDevice", "fleet_from_dict", "find_profile", "load_fleet"]
