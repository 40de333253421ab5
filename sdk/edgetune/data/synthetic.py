"""Deterministic, non-IID demo text: maintenance logs from different factory lines.

Federated fine-tuning only shows its worth when devices hold *different* data, so each device
gets the shift log of one kind of factory line, with that line's machines, parts, fault codes,
measurements and operator phrasing. Device ``i`` uses profile ``i % len(PROFILES)``; devices
that share a profile get different seeds, hence different (but similarly distributed) text.

Everything comes from one ``random.Random`` seeded with an integer derived by SHA-256 from
``(seed, device_index)``: its integer and float streams are specified by CPython, and numbers are
formatted with fixed decimals, so the output is byte-identical across runs and platforms.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_RECORDS_PER_DEVICE",
    "PROFILES",
    "LineProfile",
    "Measurement",
    "Station",
    "generate_device_texts",
    "profile_for_device",
    "write_demo_data",
]


@dataclass(frozen=True)
class Measurement:
    """A quantity a station logs, with its in-spec range ``[low, high]``."""

    name: str
    unit: str
    low: float
    high: float
    decimals: int

    def __post_init__(self) -> None:
        if not self.low < self.high:
            raise ValueError(f"Measurement {self.name!r}: low must be < high")


@dataclass(frozen=True)
class Station:
    """One kind of machine on a line; its faults, readings and parts belong together.

    Tying them to the station keeps entries coherent ("capper 3: torque ... replaced capper
    chuck insert"), which gives a language model real structure to learn.
    """

    name: str
    count: int  # stations are numbered 1..count on the line
    parts: tuple[str, ...]
    faults: tuple[tuple[str, str], ...]  # (code, text)
    measurements: tuple[Measurement, ...]
    observations: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"Station {self.name!r}: count must be >= 1, got {self.count}")
        for field_name in ("parts", "faults", "measurements", "observations"):
            if not getattr(self, field_name):
                raise ValueError(f"Station {self.name!r}: {field_name} must not be empty")


@dataclass(frozen=True)
class LineProfile:
    """The vocabulary of one kind of factory line; templates fill their slots from it.

    ``actions`` use ``{part}``, ``outcomes`` may use ``{n}``; ``shift_names`` are for the
    morning (06-14), afternoon (14-22) and night shifts.
    """

    name: str
    description: str
    stations: tuple[Station, ...]
    actions: tuple[str, ...]
    outcomes: tuple[str, ...]
    products: tuple[str, ...]
    remarks: tuple[str, ...]
    shift_names: tuple[str, str, str]

    def __post_init__(self) -> None:
        for field_name in ("stations", "actions", "outcomes", "products", "remarks"):
            if not getattr(self, field_name):
                raise ValueError(f"LineProfile {self.name!r}: {field_name} must not be empty")


M, S = Measurement, Station
PROFILES: tuple[LineProfile, ...] = (
    LineProfile(
        name="bottling",
        description="Beverage bottling plant: rinse, fill, cap, label, pack.",
        stations=(
            S("rinser", 2, ("rinser nozzle", "gripper spring"),
              (("RN-052", "rinse water pressure low"), ("RN-060", "gripper not closed")),
              (M("rinse water pressure", "bar", 2.0, 3.0, 1),),
              ("bottles coming out wet", "gripper dropping bottles")),
            S("filler", 2, ("filling valve seal", "vent tube", "level probe"),
              (("FL-214", "fill level low"), ("FL-230", "product tank pressure low")),
              (M("fill height", "mm below neck", 18, 24, 0), M("CO2 pressure", "bar", 3.2, 3.8, 1)),
              ("foam spilling at the filling valves", "underfilled bottles at the checkweigher")),
            S("capper", 3, ("capper chuck insert", "cap chute guide", "torque clutch"),
              (("CP-031", "cap missing"), ("CP-044", "cap feeder empty")),
              (M("torque on capper head", "Nm", 2.0, 2.5, 1),),
              ("caps seated crooked on the neck", "scuffed caps after the chuck")),
            S("labeler", 2, ("glue roller", "vacuum cup", "label magazine spring"),
              (("LB-118", "label web break"), ("LB-121", "glue temperature low")),
              (M("label skew", "mm", 0.0, 1.5, 1), M("glue temperature", "degC", 140, 160, 0)),
              ("labels creased at the overlap", "glue strings on the label magazine")),
            S("conveyor", 6, ("conveyor chain link", "infeed guide rail", "star wheel"),
              (("CV-007", "bottle jam at infeed"), ("CV-019", "chain lubrication low")),
              (M("conveyor speed", "bottles/min", 380, 420, 0),),
              ("bottles tipping on the transfer", "glass shards at the infeed")),
        ),
        actions=("replaced {part}", "re-torqued {part}", "cleaned {part} with caustic",
                 "adjusted {part}", "swapped {part} from spares"),
        outcomes=("retested {n} bottles, OK", "ran {n} bottles through the checkweigher, all good",
                  "line back to rated speed", "{n} bottles pulled for QA, all good"),
        products=("500 ml PET", "1 l glass", "330 ml sparkling", "1.5 l still water"),
        remarks=("QA informed.", "Spare chuck inserts low, ordered more.",
                 "Handover: keep an eye on the capper.", "CIP due after this run."),
        shift_names=("shift A", "shift B", "shift C"),
    ),
    LineProfile(
        name="cnc",
        description="CNC machining cell: mills, lathes and a grinder cutting aluminium housings.",
        stations=(
            S("VMC", 4, ("spindle bearing", "tool changer gripper", "drawbar spring"),
              (("ALM 1021", "spindle overload"), ("ALM 2045", "tool changer arm out of position")),
              (M("spindle vibration", "mm/s", 0.8, 2.8, 1),
               M("spindle temperature", "degC", 28, 45, 0)),
              ("tool holder pulled out of the taper", "chatter marks on the finish pass")),
            S("lathe", 3, ("chuck jaw", "tailstock quill", "turret clamp"),
              (("ALM 1500", "chuck clamp not confirmed"), ("ALM 0410", "servo excess error Z")),
              (M("bore diameter", "mm", 24.99, 25.01, 3), M("chuck pressure", "bar", 18, 25, 0)),
              ("swarf packed around the chuck", "taper on the turned diameter")),
            S("5-axis mill", 2, ("trunnion brake", "way wiper", "ball screw nut"),
              (("ALM 0700", "axis overtravel X+"), ("ALM 0725", "rotary axis clamp fault")),
              (M("surface roughness Ra", "um", 0.4, 1.6, 2),),
              ("insert chipped on the roughing mill", "burr along the slot edge")),
            S("coolant system", 1, ("coolant pump filter", "skimmer belt"),
              (("ALM 3302", "coolant tank level low"),
               ("ALM 3310", "through-spindle pressure low")),
              (M("coolant concentration", "% Brix", 6, 9, 1),),
              ("coolant smelling rancid", "tramp oil floating on the tank")),
        ),
        actions=("changed {part}", "re-shimmed {part}", "blew out {part} and re-greased",
                 "re-indexed {part}", "fitted new {part}"),
        outcomes=("first-off part on the CMM, in tolerance", "ran {n} parts, bores in tolerance",
                  "offsets updated and cycle restarted",
                  "checked {n} parts with the bore gauge, OK"),
        products=("housing 4512 rev C", "flange 220", "pump body 88", "bracket 31-B"),
        remarks=("Program O4512 proven out.", "CNMG insert stock low.",
                 "Told the setter on next shift.", "Tool life counter reset."),
        shift_names=("day shift", "back shift", "night shift"),
    ),
    LineProfile(
        name="injection_moulding",
        description="Injection moulding shop: presses with robots, resin dryers and chillers.",
        stations=(
            S("press", 8, ("barrel heater band", "thermocouple", "check ring", "screw tip"),
              (("E-47", "barrel heater zone open circuit"),
               ("E-29", "hydraulic oil overtemperature")),
              (M("barrel zone 3", "degC", 225, 240, 0),
               M("injection pressure", "bar", 850, 1050, 0),
               M("cushion", "mm", 4.0, 8.0, 1), M("cycle time", "s", 18.0, 21.5, 1)),
              ("short shots on cavity 2", "black specks in the mouldings")),
            S("mould", 8, ("ejector pin", "hot runner nozzle", "mould vent insert"),
              (("E-12", "ejector not retracted"), ("E-88", "mould protection tripped")),
              (M("mould temperature", "degC", 55, 65, 0),),
              ("flash along the parting line", "parts sticking on the core side",
               "sink marks near the boss")),
            S("resin dryer", 2, ("hopper magnet", "desiccant cartridge", "dryer heater"),
              (("E-63", "hopper low material"), ("E-66", "dew point alarm")),
              (M("resin moisture", "%", 0.005, 0.02, 3), M("dryer dew point", "degC", -45, -35, 0)),
              ("splay streaks on the surface", "pellets bridging in the hopper")),
            S("robot picker", 8, ("vacuum gripper pad", "sprue gripper"),
              (("E-71", "robot vacuum not made"), ("E-74", "robot not in safe zone")),
              (M("robot take-out time", "s", 1.2, 1.8, 1),),
              ("dropped parts under the tool", "sprue left in the mould")),
        ),
        actions=("replaced {part}", "purged and checked {part}", "polished {part}",
                 "tightened {part} connector", "swapped {part} and reset the heats"),
        outcomes=("{n} shots purged, mouldings clean", "weighed {n} shots, within 0.2 g",
                  "dimensions checked on {n} parts, OK", "process back on the validated window"),
        products=("PP closure 28 mm", "ABS housing lid", "PA66 clip", "HDPE crate"),
        remarks=("Resin lot PP-2291 in the dryer.", "Mould due for PM at 200k shots.",
                 "Regrind kept at 15 percent.", "Setter to check the hot runner tomorrow."),
        shift_names=("early shift", "late shift", "night shift"),
    ),
    LineProfile(
        name="bakery",
        description="Industrial bakery: dividing, proofing, tunnel ovens, cooling and slicing.",
        stations=(
            S("divider", 2, ("divider piston", "knife seal", "hopper flap"),
              (("DV-19", "divider overload"), ("DV-22", "oil pump low")),
              (M("dough piece weight", "g", 805, 820, 0),
               M("dough temperature", "degC", 25, 28, 1)),
              ("dough sticking in the divider hopper", "double pieces on the belt")),
            S("proofer", 1, ("steam injector", "proofer tray chain"),
              (("PR-04", "proofer steam valve fault"), ("PR-09", "proofer door open")),
              (M("proofer humidity", "%RH", 78, 85, 0),
               M("proofer temperature", "degC", 36, 40, 0)),
              ("buns touching in the proofer", "dough skinning on top")),
            S("tunnel oven", 1, ("burner igniter", "oven mesh belt", "flue damper"),
              (("OV-11", "flame failure on burner 2"), ("OV-15", "oven belt slip")),
              (M("oven zone 2", "degC", 215, 230, 0), M("belt speed", "m/min", 1.8, 2.2, 2),
               M("loaf core temperature", "degC", 94, 98, 0)),
              ("pale crust on the left lane", "blisters on the crust", "loaves stuck in the tins")),
            S("slicer", 2, ("slicer blade", "bagger clip", "crumb tray"),
              (("SL-02", "slicer guard open"), ("CL-07", "cooler belt tracking")),
              (M("slice thickness", "mm", 11.0, 13.0, 1),),
              ("crumbs building up under the slicer", "torn slices at the heel")),
        ),
        actions=("changed {part}", "scraped and re-oiled {part}", "realigned {part}",
                 "sharpened {part}", "reset {part} after cooling down"),
        outcomes=("{n} loaves checked, colour even", "probed {n} loaves, cores above 94",
                  "scaled {n} dough pieces, on weight", "bake back on profile"),
        products=("white tin loaf", "sourdough batch", "seeded rolls", "brioche buns"),
        remarks=("Flour silo 2 switched in.", "Sanitation at end of shift.", "Pan oil topped up.",
                 "Allergen changeover signed off."),
        shift_names=("morning bake", "afternoon bake", "night bake"),
    ),
    LineProfile(
        name="paint_shop",
        description="Automotive paint shop: pretreatment, e-coat, robot spray booths, curing.",
        stations=(
            S("pretreatment tank", 4, ("spray riser", "bath heater coil"),
              (("PT-15", "phosphate bath pH out of range"), ("PT-21", "degreaser level low")),
              (M("phosphate bath pH", "pH", 3.0, 3.6, 1),),
              ("water breaks on the panel", "rust bloom after rinse")),
            S("e-coat tank", 1, ("anode cell", "ultrafilter membrane"),
              (("EC-09", "e-coat rectifier trip"), ("EC-14", "bath solids low")),
              (M("e-coat voltage", "V", 250, 320, 0), M("bath temperature", "degC", 30, 34, 0)),
              ("thin coat on the sill", "craters on the roof panel")),
            S("spray booth", 3, ("booth filter", "supply fan belt", "colour changer valve"),
              (("PB-301", "booth downdraft low"), ("PB-310", "booth humidity out of range")),
              (M("booth humidity", "%RH", 55, 65, 0), M("paint viscosity", "s DIN4", 22, 26, 0)),
              ("dirt inclusions in the clearcoat", "overspray on the masking")),
            S("robot bell", 6, ("bell cup", "air cap", "paint pump diaphragm"),
              (("RB-112", "bell speed deviation"), ("RB-140", "shaping air fault")),
              (M("bell speed", "krpm", 40, 55, 0), M("film thickness", "um", 35, 50, 0)),
              ("orange peel on the bonnet", "runs on the door edges")),
            S("curing oven", 1, ("conveyor skid hook", "exhaust fan bearing"),
              (("OV-221", "oven exhaust fan fault"), ("OV-230", "burner lockout")),
              (M("oven metal temperature", "degC", 160, 180, 0), M("gloss", "GU", 88, 95, 0)),
              ("soft clearcoat after the oven", "yellowing on white bodies")),
        ),
        actions=("cleaned {part} with solvent", "replaced {part}", "flushed {part}",
                 "re-taught the robot path near {part}", "changed {part} and purged the line"),
        outcomes=("re-sprayed {n} panels, passed gloss check",
                  "{n} bodies inspected in the light tunnel, OK",
                  "measured {n} panels with the DFT gauge, in range", "booth back to balance"),
        products=("metallic grey", "solid white", "pearl red", "black clearcoat"),
        remarks=("Tack rags restocked.", "Booth filters due Friday.", "Colour match sent to lab.",
                 "Masking tape lot changed."),
        shift_names=("A crew", "B crew", "C crew"),
    ),
    LineProfile(
        name="tablet_press",
        description="Pharmaceutical solid-dose suite: tablet press, coating pan, blister packer.",
        stations=(
            S("tablet press", 2, ("upper punch", "die", "feeder paddle", "ejection cam"),
              (("TP-501", "upper punch tight"), ("TP-514", "weight control out of limits")),
              (M("tablet hardness", "kp", 8.0, 12.0, 1), M("tablet weight", "mg", 495, 505, 1),
               M("main compression force", "kN", 14.0, 18.0, 1)),
              ("sticking on the embossed logo", "capping on tablets after ejection")),
            S("coating pan", 1, ("spray nozzle", "pan baffle", "peristaltic tubing"),
              (("CT-08", "spray gun blocked"), ("CT-12", "exhaust air pressure high")),
              (M("inlet air temperature", "degC", 55, 65, 0), M("weight gain", "%", 2.5, 3.5, 1)),
              ("twinning in the coating pan", "black spots on the tablets")),
            S("blister packer", 2, ("forming foil roll", "heat seal plate", "feed brush"),
              (("BL-220", "foil splice detected"), ("BL-231", "empty pocket rejects high")),
              (M("seal temperature", "degC", 150, 165, 0),),
              ("blisters not sealed at the edge", "pinholes in the lidding foil")),
            S("deduster", 2, ("deduster screen", "metal detector coil"),
              (("MD-03", "metal detector test failed"), ("DD-05", "dust extraction low")),
              (M("friability", "%", 0.10, 0.80, 2),),
              ("powder build-up on the screen", "chipped tablets at the outlet")),
        ),
        actions=("polished {part}", "replaced {part} under change control",
                 "cleaned and dried {part}", "re-set {part} per SOP",
                 "inspected {part} under loupe"),
        outcomes=("in-process check on {n} tablets, within limits",
                  "{n} blister cards leak-tested, passed", "QA released the line",
                  "weighed {n} tablets, RSD below 1 percent"),
        products=("metformin 500 mg", "ibuprofen 200 mg", "vitamin D 1000 IU", "placebo batch"),
        remarks=("Deviation raised in the batch record.", "Line clearance signed by QA.",
                 "Tooling sent for polishing.", "Logbook countersigned."),
        shift_names=("shift 1", "shift 2", "shift 3"),
    ),
    LineProfile(
        name="weaving",
        description="Textile weaving hall: warping, sizing, air-jet and rapier looms.",
        stations=(
            S("air-jet loom", 12, ("main nozzle", "relay nozzle", "weft feeder", "drop wire"),
              (("W-22", "weft stop"), ("W-35", "filling detector fault")),
              (M("weft insertion air", "bar", 3.5, 4.5, 1), M("loom speed", "rpm", 650, 750, 0)),
              ("weft stopping mid-shed", "double picks on the left side")),
            S("rapier loom", 6, ("rapier tape", "gripper head", "temple roller", "heddle"),
              (("W-14", "warp break"), ("W-08", "selvedge break")),
              (M("warp tension", "cN", 180, 220, 0), M("pick density", "picks/cm", 28.0, 30.0, 1)),
              ("loose picks at the selvedge", "starting marks in the cloth")),
            S("sizing machine", 1, ("size box squeeze roller", "drying cylinder scraper"),
              (("W-41", "let-off motor overload"), ("W-47", "size box level low")),
              (M("size pick-up", "%", 10, 14, 1), M("hall humidity", "%RH", 60, 70, 0)),
              ("hard size on the yarn", "yarns sticking on the cylinders")),
            S("inspection frame", 2, ("cloth roller", "cutter blade"),
              (("W-50", "take-up mismatch"), ("W-53", "roll length counter fault")),
              (M("defects per 100 m", "points", 2, 12, 0),),
              ("reed marks along the warp", "fluff woven into the cloth")),
        ),
        actions=("re-drew {part}", "replaced {part}", "blew fluff out of {part}",
                 "re-tensioned {part}", "knotted in and reset {part}"),
        outcomes=("wove {n} metres, clean at inspection", "loom running at full pick rate",
                  "{n} metres checked on the frame, no faults", "stop rate back under 2 per hour"),
        products=("twill 2/1 denim", "poplin shirting", "canvas 12 oz", "satin lining"),
        remarks=("Beam 17 due off tonight.", "Fluff blown down on all looms.",
                 "Weaver asked for more heddles.", "Style change booked for Monday."),
        shift_names=("first turn", "second turn", "third turn"),
    ),
)
del M, S


DEFAULT_RECORDS_PER_DEVICE = 400
_START = datetime(2024, 1, 1)
_START_SPREAD_MIN = 90 * 24 * 60  # devices start their logs somewhere in the first quarter
_BATCH_SIZES = (5, 10, 12, 20, 25, 40, 50, 100)  # the {n} in outcomes: how many were checked


def profile_for_device(device_index: int) -> LineProfile:
    """Device ``i`` logs for line ``i % len(PROFILES)`` (the fleet wraps around the profiles)."""
    if device_index < 0:
        raise ValueError(f"device_index must be >= 0, got {device_index}")
    return PROFILES[device_index % len(PROFILES)]


def _device_rng(device_index: int, seed: int) -> random.Random:
    # Hashing (rather than seed + index) keeps neighbouring seeds/devices uncorrelated, and
    # seeding with an int avoids depending on how Random hashes str/bytes seeds.
    digest = hashlib.sha256(f"edgetune-demo:{seed}:{device_index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _fmt(value: float, decimals: int) -> str:
    return f"{value:.{decimals}f}"


def _reading(rng: random.Random, m: Measurement, in_spec: bool) -> str:
    """One reading; out-of-spec readings state the limit they crossed."""
    span = m.high - m.low
    if in_spec:
        value = rng.uniform(m.low, m.high)
        return f"routine check, {m.name} {_fmt(value, m.decimals)} {m.unit}, in spec."
    if m.low > 0 and rng.random() < 0.4:
        value = m.low - span * rng.uniform(0.05, 0.4)
        verb = rng.choice(("fell to", "dropped to", "read"))
        bound = f"min {_fmt(m.low, m.decimals)}"
    else:
        value = m.high + span * rng.uniform(0.05, 0.4)
        verb = rng.choice(("drifted to", "rose to", "read"))
        bound = f"limit {_fmt(m.high, m.decimals)}"
    return f"{m.name} {verb} {_fmt(value, m.decimals)} {m.unit} ({bound})."


def _event(rng: random.Random, p: LineProfile, s: Station) -> tuple[str, bool]:
    """The first sentence's body, and whether it calls for a corrective action."""
    roll = rng.random()
    if roll < 0.35:
        return _reading(rng, rng.choice(s.measurements), in_spec=False), True
    if roll < 0.65:
        code, text = rng.choice(s.faults)
        return f"alarm {code} {text}; {rng.choice(s.observations)}.", True
    if roll < 0.80:
        return f"{rng.choice(s.observations)} during {rng.choice(p.products)} run.", True
    if roll < 0.90:
        return f"changeover to {rng.choice(p.products)} done.", False
    return _reading(rng, rng.choice(s.measurements), in_spec=True), False


def _fix(rng: random.Random, p: LineProfile, s: Station) -> str:
    """The corrective-action sentence: what the operator did and how it was verified."""
    action = rng.choice(p.actions).format(part=rng.choice(s.parts))
    outcome = rng.choice(p.outcomes).format(n=rng.choice(_BATCH_SIZES))
    return f"{action[0].upper()}{action[1:]}, {outcome}."


def _record(rng: random.Random, p: LineProfile, when: datetime) -> str:
    """One log entry of 1-3 sentences: header + event, then a fix, then a remark."""
    shift = p.shift_names[0 if 6 <= when.hour < 14 else 1 if 14 <= when.hour < 22 else 2]
    station = rng.choice(p.stations)
    event, needs_fix = _event(rng, p, station)
    header = f"{when:%Y-%m-%d %H:%M} {shift}, {station.name} {rng.randint(1, station.count)}"
    sentences = [f"{header}: {event}"]
    if needs_fix:
        sentences.append(_fix(rng, p, station))
    if rng.random() < 0.35:
        sentences.append(rng.choice(p.remarks))
    return " ".join(sentences)


def generate_device_texts(device_index: int, n_records: int, seed: int = 0) -> list[str]:
    """The ``n_records`` log entries of device ``device_index`` (0-based), in time order."""
    profile = profile_for_device(device_index)
    if n_records < 0:
        raise ValueError(f"n_records must be >= 0, got {n_records}")
    rng = _device_rng(device_index, seed)
    when = _START + timedelta(minutes=rng.randrange(_START_SPREAD_MIN))
    records = []
    for _ in range(n_records):
        when += timedelta(minutes=rng.randint(7, 300))
        records.append(_record(rng, profile, when))
    return records


def write_demo_data(
    out_dir: Path,
    n_devices: int,
    n_records: int = DEFAULT_RECORDS_PER_DEVICE,
    seed: int = 0,
) -> list[Path]:
    """Write ``device-1.txt`` ... ``device-N.txt`` (device ``k`` is index ``k - 1``).

    Each file is written to a temporary name and renamed, so a reader (or a second demo run)
    never sees a half-written file.
    """
    if n_devices < 1:
        raise ValueError(f"n_devices must be >= 1, got {n_devices}")
    if n_records < 1:
        raise ValueError(f"n_records must be >= 1, got {n_records}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for index in range(n_devices):
        path = out_dir / f"device-{index + 1}.txt"
        text = "".join(r + "\n" for r in generate_device_texts(index, n_records, seed))
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            # newline="" writes "\n" as-is on every platform, keeping the bytes identical.
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                f.write(text)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        paths.append(path)
        log.info("wrote %s: %d records of the %s line", path, n_records,
                 profile_for_device(index).name)
    return paths
