"""What a run report is made of, read from the aggregator's state dir (no daemon needed).

``rounds.json`` (one record per closed round: who was asked, who answered, plans, exclusions,
bytes, refusals), ``state.json`` (the fleet), ``devices/*.msgpack`` (each device's hello, with its
profile) and, after a simulation, ``simulation.json`` (each device's compute and traffic in
simulated time).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


class ReportError(ValueError):
    """The folder is not an aggregator state dir (or holds no round yet)."""


@dataclass
class RunData:
    state_dir: Path
    fleet: str
    rounds: list[dict]
    #: device id -> its profile as announced (a dict of DeviceProfile's fields), if it sent one
    profiles: dict[str, dict] = field(default_factory=dict)
    #: device id -> {"sdk": version, "backends": [...], "samples": n}
    devices: dict[str, dict] = field(default_factory=dict)
    adapter: dict = field(default_factory=dict)
    strategy: str = ""
    global_version: int = 0
    simulation: dict | None = None

    @property
    def train_rounds(self) -> list[dict]:
        return [r for r in self.rounds if r["kind"] == "train"]

    @property
    def device_ids(self) -> list[str]:
        seen = set(self.devices)
        for r in self.rounds:
            seen |= {d["device_id"] for d in r["devices"]} | set(r.get("asked", [])) | set(r.get("excluded", {}))
        return sorted(seen)


def load_run(state_dir: str | Path) -> RunData:
    from ..wire import FILE_VERSIONS, Hello, decode_message

    state_dir = Path(state_dir)
    rounds_file, state_file = state_dir / "rounds.json", state_dir / "state.json"
    if not rounds_file.is_file():
        hint = " (it holds no rounds.json yet: has a round closed?)" if state_file.is_file() else ""
        raise ReportError(f"{state_dir} is not an aggregator state dir{hint}: pass the --state-dir of "
                          "'edgetune-aggregator serve', or the demo's/simulation's out/state")
    try:
        rounds = json.loads(rounds_file.read_text())
        state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    except ValueError as exc:
        raise ReportError(f"{state_dir}: a state file is not valid JSON: {exc}") from None
    profiles, devices = {}, {}
    for path in sorted((state_dir / "devices").glob("*.msgpack")):
        try:
            hello = decode_message(path.read_bytes(), FILE_VERSIONS)
        except Exception as exc:  # (written atomically by the daemon: only tampering gets here)
            log.warning("skipping %s: %s", path, exc)
            continue
        if not isinstance(hello, Hello):
            continue
        devices[hello.device_id] = {"sdk": hello.sdk_version, "backends": list(hello.capabilities.backends),
                                    "samples": hello.num_samples}
        if hello.profile is not None:
            import dataclasses

            profiles[hello.device_id] = dataclasses.asdict(hello.profile)
    simulation = None
    if (state_dir / "simulation.json").is_file():
        simulation = json.loads((state_dir / "simulation.json").read_text())
    return RunData(state_dir, state.get("fleet", ""), rounds, profiles, devices, state.get("adapter", {}),
                   state.get("strategy", ""), state.get("global_version", 0), simulation)


__all__ = ["ReportError", "RunData", "load_run"]
