"""Importance-selected LoRA layout vs the fixed q_proj + v_proj layout, at equal parameter count.

3 devices, one ``fortunes`` category each (``benchmarks/fortunes.py``), SmolLM2-135M. First a
calibration round: every device scores all 7 projection kinds of every layer (210 matrices,
``Workload.importance``), the scores are combined sample-weighted and a layout is selected at
rank 8 within the budget of q_proj + v_proj at rank 8 in every layer (460,800 parameters;
``edgetune.planning.layout``). Then each arm is trained federated with FedAvg of the factors
(``fedit``; every device at the same rank) for R rounds of S local steps, from the same seeds
and on the same batches, and the global adapter's held-out perplexity on each device's held-out
entries is measured after every round:

- **fixed**: q_proj and v_proj in every layer, rank 8 (the common default);
- **selected**: the importance-selected matrices, rank 8;
- **all-kinds**: all 7 kinds in every layer at the largest rank whose cost fits the budget
  (rank 1 here: 305,280 parameters, two thirds of the budget).

Every arm keeps the LoRA scale alpha / r = 2. Round 0 is the base (every adapter starts with
B = 0), the same for every arm. Usage::

    python benchmarks/importance.py [--rounds 3] [--steps 8] [--arms fixed selected all-kinds]

The default runs the first two arms (about 8 minutes on 2 cores); all three take about 12.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import sys
import time
from datetime import date
from pathlib import Path

import fortunes

log = logging.getLogger("importance")

ARMS = ("fixed", "selected", "all-kinds")
DEFAULT_ARMS = ("fixed", "selected")  # all-kinds adds half again to the run time
RESULTS = Path(__file__).resolve().parent / "results" / "importance.json"


def calibrate(devices: list, shapes: dict, args: argparse.Namespace) -> tuple[dict, list[dict]]:
    """Every device's scores of all candidate matrices, and the sample-weighted combination."""
    from edgetune.planning.layout import LLAMA_KINDS, candidate_modules, combine_scores
    from edgetune.wire import ImportanceSettings, TrainSettings

    modules = candidate_modules(shapes, LLAMA_KINDS)
    settings = TrainSettings(batch_size=args.batch, seq_len=args.seq_len, seed=args.seed)
    reports, costs = [], []
    for i, device in enumerate(devices):
        # its own seed: the calibration batches need not be the first training batches
        result = device.workload.importance(modules, settings, ImportanceSettings(batches=args.calibration_batches),
                                            seed=args.seed + 1000 + i)
        reports.append((result.scores, device.num_samples))
        costs.append({"device": device.name, "seconds": result.seconds, "tokens": result.tokens,
                      "batches": result.batches, "state_mb": result.state_bytes / 1e6})
        log.info("%s: scored %d matrices in %.0f s (%d tokens)", device.name, len(modules), result.seconds,
                 result.tokens)
    return combine_scores(reports), costs


def arm_specs(combined: dict, shapes: dict, rank: int, arms: list[str]) -> dict:
    """Each arm's LoRA spec and what it costs; the selected layout's details."""
    from edgetune.planning.layout import (
        LLAMA_KINDS,
        adapter_cost,
        candidate_modules,
        fixed_layout_budget,
        select_layout,
    )
    from edgetune.wire import LoraSpec

    budget = fixed_layout_budget(shapes, rank=rank)
    out = {}
    for arm in arms:
        if arm == "fixed":
            modules = candidate_modules(shapes, ("q_proj", "v_proj"))
            arm_rank, extra = rank, {}
        elif arm == "selected":
            layout = select_layout(combined, shapes, rank, budget)
            modules, arm_rank = list(layout.modules), rank
            extra = {"score_covered": layout.score_covered, "composition": composition(modules)}
        else:
            modules = candidate_modules(shapes, LLAMA_KINDS)
            fits = [r for r in range(1, rank + 1) if adapter_cost(shapes, modules, r) <= budget]
            if not fits:
                log.warning("all-kinds: even rank 1 (%d parameters) is over the budget of %d; skipped",
                            adapter_cost(shapes, modules, 1), budget)
                continue
            arm_rank, extra = max(fits), {}
        spec = LoraSpec(rank=arm_rank, alpha=2.0 * arm_rank, target_modules=tuple(modules))
        out[arm] = {"spec": spec, "rank": arm_rank, "matrices": len(modules),
                    "params": adapter_cost(shapes, modules, arm_rank), "budget": budget,
                    "score_share": sum(combined[m] for m in modules), **extra}
    return out


def composition(modules: list[str]) -> dict[str, list[int]]:
    """Kind -> the layers it was chosen in (names ``model.layers.{i}.{block}.{kind}``)."""
    layers = collections.defaultdict(list)
    for name in modules:
        parts = name.split(".")
        layers[parts[-1]].append(int(parts[2]))
    return {kind: sorted(found) for kind, found in sorted(layers.items())}


def train_arm(devices: list, arm: dict, round0: dict, args: argparse.Namespace) -> dict:
    from edgetune.adapters.lora import init_lora
    from edgetune.wire import TrainSettings
    from edgetune_aggregator.strategies import ServerOptimizerConfig, make_strategy

    spec = arm["spec"]
    fleet = [dataclasses.replace(d, rank=spec.rank) for d in devices]  # same workloads, this arm's rank
    settings = TrainSettings(local_steps=args.steps, batch_size=args.batch, seq_len=args.seq_len,
                             learning_rate=args.lr, seed=args.seed)
    strategy = make_strategy("fedit", ServerOptimizerConfig())
    tensors, merged = init_lora(spec, devices[0].workload.manifest.modules, args.seed), {}
    batches = fortunes.streams(fleet, settings, args.seed)  # the same batches for every arm
    rounds = [{"round": 0, "ppl": round0, "mean_ppl": fortunes.weighted_mean(round0, fleet)}]
    for number in range(1, args.rounds + 1):
        tensors, merged, figures = fortunes.train_round(fleet, spec, tensors, merged, batches, settings, strategy,
                                                        seed=args.seed + number)
        ppl = fortunes.evaluate(fleet, fleet[0], spec, tensors, merged)
        rounds.append({"round": number, "ppl": ppl, "mean_ppl": fortunes.weighted_mean(ppl, fleet),
                       "mean_loss": figures["mean_loss"], "train_s": figures["train_s"]})
        log.info("round %d: mean held-out ppl %.3f (%.0f s of training)", number, rounds[-1]["mean_ppl"],
                 figures["train_s"])
    trainable = fleet[0].workload.trainer(spec).trainable_parameters
    if trainable != arm["params"]:
        raise RuntimeError(f"the trainer has {trainable} trainable parameters, the layout says {arm['params']}")
    # the fastest round: other processes on the machine only ever make a round slower
    return {"rounds": rounds, "fastest_round_s": min(r["train_s"] for r in rounds[1:])}


def report(result: dict) -> str:
    arms = result["arms"]
    rounds = len(next(iter(arms.values()))["rounds"])
    reference = arms.get("fixed")
    header = (["layout", "rank", "matrices", "trainable params"] + [f"ppl r{i}" for i in range(rounds)]
              + ["÷ fixed (last round)", "fastest round s ÷ fixed"])
    rows = []
    for name, arm in arms.items():
        last = arm["rounds"][-1]["mean_ppl"]
        rows.append([name, str(arm["rank"]), str(arm["matrices"]), f"{arm['params']:,}"]
                    + [f"{r['mean_ppl']:.3f}" for r in arm["rounds"]]
                    + [f"{last / reference['rounds'][-1]['mean_ppl']:.3f}" if reference else "n/a",
                       f"{arm['fastest_round_s'] / reference['fastest_round_s']:.2f}" if reference else "n/a"])
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if "selected" in arms:
        lines.append("\nselected layout, layers per kind:")
        for kind, layers in arms["selected"]["composition"].items():
            lines.append(f"- {kind}: {len(layers)} ({', '.join(map(str, layers))})")
    lines.append("\nshare of the combined importance score by kind: " + ", ".join(
        f"{kind} {share:.1%}" for kind, share in result["score_by_kind"].items()))
    lines.append("score covered: " + ", ".join(f"{name} {arm['score_share']:.1%}" for name, arm in arms.items()))
    lines.append("calibration per device: " + "; ".join(
        f"{c['device']} {c['seconds']:.0f} s, {c['tokens']:,} tokens" for c in result["calibration"]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(DEFAULT_ARMS))
    parser.add_argument("--categories", nargs="+", default=list(fortunes.DEFAULT_CATEGORIES[:3]))
    parser.add_argument("--rank", type=int, default=8, help="rank of the fixed and selected layouts")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="local steps per device and round")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--calibration-batches", type=int, default=4, help="importance batches per device")
    parser.add_argument("--eval-blocks", type=int, default=12, help="held-out blocks per device")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS, help="results JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("edgetune").setLevel(logging.WARNING)  # per-step and model-loading chatter

    started = time.perf_counter()
    devices = fortunes.make_devices(args.categories, [args.rank] * len(args.categories), args.seq_len,
                                    args.eval_blocks, args.threads, args.seed)
    shapes = devices[0].workload.manifest.modules
    combined, calibration = calibrate(devices, shapes, args)
    by_kind = collections.Counter()
    for name, score in combined.items():
        by_kind[name.rsplit(".", 1)[-1]] += score
    arms = arm_specs(combined, shapes, args.rank, args.arms)
    for name, arm in arms.items():
        log.info("%s: rank %d on %d matrices, %d parameters (budget %d)", name, arm["rank"], arm["matrices"],
                 arm["params"], arm["budget"])

    # round 0: B = 0 in every arm, so the global model is the base; measured once
    first = next(iter(arms.values()))["spec"]
    fleet = [dataclasses.replace(d, rank=first.rank) for d in devices]
    from edgetune.adapters.lora import init_lora

    round0 = fortunes.evaluate(fleet, fleet[0], first, init_lora(first, shapes, args.seed), {})
    for name, arm in arms.items():
        log.info("arm %s", name)
        arm.update(train_arm(devices, arm, round0, args))

    result = {
        "date": date.today().isoformat(), "argv": sys.argv[1:],
        "devices": [{"category": d.name, "train_entries": d.num_samples, "eval_tokens": int(d.eval_blocks.size)}
                    for d in devices],
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "calibration": calibration,
        "score_by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        "arms": {name: {k: v for k, v in arm.items() if k != "spec"} for name, arm in arms.items()},
        "wall_s": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    log.info("wrote %s; %.0f s in all", args.out, result["wall_s"])
    print(f"{len(devices)} devices ({', '.join(args.categories)}), fedit, {args.rounds} rounds × {args.steps} steps, "
          f"batch {args.batch} × {args.seq_len}, lr {args.lr}, seed {args.seed}; sample-weighted mean held-out "
          f"perplexity of the global adapter ({result['wall_s']:.0f} s)\n")
    print(report(result))


if __name__ == "__main__":
    main()
