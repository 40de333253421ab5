"""``edgetune plan``: the planner's choice for a set of device profiles, as a table for people."""

from __future__ import annotations

import argparse

from .costmodel import Arch, Calibration, estimate_memory
from .planner import FleetPlan, PlanOptions, plan_fleet, ranks_up_to


def format_plan(plan: FleetPlan, profiles: dict, calibration: Calibration, arch: Arch) -> str:
    lines = [f"{'device':<28}{'memory':>9}{'rank':>6}{'base':>10}{'batch':>7}{'ckpt':>6}{'steps':>7}"
             f"{'step s':>8}{'peak MiB':>10}{'tokens':>9}"]
    for name in sorted(profiles):
        budget = f"{profiles[name].memory_bytes / 2**30:.1f}G"
        choice = plan.chosen.get(name)
        if choice is None:
            lines.append(f"{name:<28}{budget:>9}  excluded: {plan.excluded.get(name, '')}")
            continue
        c = choice.config
        peak = estimate_memory(arch, c, calibration).total / 2**20
        lines.append(f"{name:<28}{budget:>9}{c.rank:>6}{c.quantization:>10}{c.batch_size:>7}"
                     f"{'on' if c.gradient_checkpointing else 'off':>6}{choice.local_steps:>7}"
                     f"{choice.step_s:>8.2f}{peak:>10,.0f}{choice.tokens:>9,}")
    lines.append(f"{len(plan.chosen)} of {len(profiles)} devices take part; {plan.tokens:,} tokens per round "
                 f"(solved by {plan.method})")
    return "\n".join(lines)


def run_plan(args: argparse.Namespace) -> int:
    from ..models import load_model
    from ..profiling import load_profile

    profiles = {}
    for path in args.profiles:
        profile = load_profile(path)
        profiles[profile.name] = profile
    arch = Arch.from_manifest(load_model(args.model).manifest)
    options = PlanOptions(
        deadline_s=args.deadline,
        seq_len=args.seq_len,
        ranks=ranks_up_to(args.max_rank),
        target_modules=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
        max_local_steps=args.max_steps,
        uplink_budget_bytes=args.uplink_budget_mb * 1e6 if args.uplink_budget_mb else None,
    )
    calibration = Calibration.load()
    plan = plan_fleet(profiles, arch, options, calibration)
    print(format_plan(plan, profiles, calibration, arch))
    return 0
