"""Planner vs one-size-fits-all on a simulated heterogeneous fleet.

20 devices drawn from the 5 device classes in ``profiles/``, with each figure jittered ±15 %
(seeded) because no two deployed boards are identical. The model is SmolLM2-135M and rounds are
5 minutes. Nothing trains here: every configuration is judged by the calibrated cost model.
The per-device figures this relies on are checked against measurement in ``docs/planner.md``.

Compared, in one run:

- **planner**: each device gets its own configuration (``plan_fleet``).
- **fit the weakest**: one configuration for everyone, the best one that fits every device's
  memory. Each device then takes as many steps as its speed allows.
- **fixed default**: rank 8, float32 base, batch 4, no checkpointing (the demo's settings).
  Devices it does not fit sit the round out.

Reported: tokens trained per round, devices taking part, and the ratios. Usage::

    python benchmarks/planner.py [--devices 20] [--deadline 300] [--seed 0] [--markdown]
"""

from __future__ import annotations

import argparse
import dataclasses
import random
from pathlib import Path

from edgetune.models import load_model
from edgetune.planning.costmodel import Arch, Calibration, Config
from edgetune.planning.planner import Candidate, PlanOptions, candidates, plan_fleet
from edgetune.profiling import load_profile

PROFILES = Path(__file__).resolve().parents[1] / "profiles"


def fleet(n: int, seed: int) -> dict:
    classes = [load_profile(p) for p in sorted(PROFILES.glob("*.yaml")) if p.stem != "this-machine"]
    rng = random.Random(seed)
    devices = {}
    for i in range(n):
        base = classes[i % len(classes)]
        jitter = lambda: rng.uniform(0.85, 1.15)  # noqa: E731
        devices[f"{base.name}-{i:02d}"] = dataclasses.replace(
            base,
            name=f"{base.name}-{i:02d}",
            memory_bytes=int(base.memory_bytes * jitter()),
            gflops={k: v * jitter() for k, v in base.gflops.items()},
        )
    return devices


def run_everywhere(config: Config, devices: dict, arch: Arch, options: PlanOptions, cal: Calibration):
    """Every device runs ``config``: tokens per device (0 where it does not fit). Feasibility
    and step counts come from the planner's own ``candidates``, restricted to this config."""
    only = dataclasses.replace(options, ranks=(config.rank,), quantizations=(config.quantization,),
                               batch_sizes=(config.batch_size,), checkpointing=(config.gradient_checkpointing,))
    tokens = {}
    for name, profile in devices.items():
        found, _ = candidates(arch, profile, only, cal)
        tokens[name] = found[0].tokens if found else 0
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--deadline", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()

    arch = Arch.from_manifest(load_model(None).manifest)
    cal = Calibration.load()
    devices = fleet(args.devices, args.seed)
    options = PlanOptions(deadline_s=args.deadline, ranks=(2, 4, 8, 16), max_local_steps=200)

    planned = plan_fleet(devices, arch, options, cal)
    plan_tokens = {d: c.tokens for d, c in planned.chosen.items()}

    # fit the weakest: the one configuration, feasible (memory) on every device, that trains most
    weakest = min(devices.values(), key=lambda p: p.memory_bytes)
    feasible: list[Candidate] = candidates(arch, weakest, options, cal)[0]
    best_uniform, best_total = None, -1
    for candidate in feasible:
        tokens = run_everywhere(candidate.config, devices, arch, options, cal)
        if all(tokens.values()) and sum(tokens.values()) > best_total:
            best_uniform, best_total = candidate.config, sum(tokens.values())
    uniform = run_everywhere(best_uniform, devices, arch, options, cal) if best_uniform else {d: 0 for d in devices}
    default = run_everywhere(Config(8, "float32", 4, options.seq_len), devices, arch, options, cal)

    rows = [
        ("planner (per device)", plan_tokens),
        (f"fit the weakest ({_describe(best_uniform)})", uniform),
        ("fixed default (r8, float32, batch 4)", default),
    ]
    base = sum(plan_tokens.values())
    print(f"{args.devices} devices from {len({p.name.rsplit('-', 1)[0] for p in devices.values()})} classes, "
          f"{args.deadline:.0f} s rounds, SmolLM2-135M, seed {args.seed}")
    if args.markdown:
        print("\n| configuration | tokens per round | devices taking part | planner ÷ this |\n|---|---:|---:|---:|")
    for label, tokens in rows:
        total = sum(tokens.values())
        taking_part = sum(1 for t in tokens.values() if t)
        ratio = base / total if total else float("inf")
        if args.markdown:
            print(f"| {label} | {total:,} | {taking_part}/{len(devices)} | {ratio:.2f}× |")
        else:
            print(f"{label:<48} {total:>10,} tokens  {taking_part:>2}/{len(devices)} devices  planner ÷ this: {ratio:.2f}")
    print("\nper class (planner's choice):")
    for name in sorted(planned.chosen)[:: max(1, args.devices // 5)]:
        c = planned.chosen[name]
        print(f"  {name:<28} {_describe(c.config)}, {c.local_steps} steps")
    for name, why in planned.excluded.items():
        print(f"  {name:<28} excluded: {why}")


def _describe(config: Config | None) -> str:
    if config is None:
        return "none fits all"
    ckpt = ", checkpointing" if config.gradient_checkpointing else ""
    return f"r{config.rank}, {config.quantization}, batch {config.batch_size}{ckpt}"


if __name__ == "__main__":
    main()
