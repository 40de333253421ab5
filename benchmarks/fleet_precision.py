"""What quantized deltas cost in the FedPipe fleet (wire v2): arm (a) of ``benchmarks/fleet.py``
(edgetune automatic, the sweep's strategy and server optimizer) run with ``--delta-precision``
fp32, fp16 and int8, same seed, same data, same simulated fleet. Each run reports the bytes of
the updates each device sent per round (signed, chunked, as they crossed its link), the bytes
of the global adapter each device downloads per round, and the final perplexity on everyone's
held-out text.

The targets (issue 17): int8 updates at most 0.27× float32's bytes per device and round, and a
final perplexity within 1 % of the float32 arm's. The planner sees the smaller updates (its
upload time is training time), so a quantized arm may also plan more steps on a slow link: that
is part of what the setting does, and the report shows the tokens trained per round.

Usage::

    python benchmarks/fleet_precision.py                 # seed 0, about 1–2 h on 2 cores
    python benchmarks/fleet_precision.py --stage report  # the docs section from the results file
    python benchmarks/fleet_precision.py --model tiny-llama --rounds 2 --devices 3 --results /tmp/p.json  # smoke

Runs are saved in ``benchmarks/results/fleet.json`` (``precision/{p}/seed{s}``) as they finish;
one already there is not repeated.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("fp32", "fp16", "int8")
log = logging.getLogger("fleet")


def run(bench, seeds: list[int]) -> None:
    from fleet import sweep_winner

    winner = sweep_winner(bench.results)
    if winner is None:
        raise SystemExit("run the sweep of benchmarks/fleet.py first: these arms use its winner")
    strategy, optimizer, extra = winner
    for seed in seeds:
        for precision in PRECISIONS:
            key = f"precision/{precision}/seed{seed}"
            if key in bench.results["runs"]:
                continue
            log.info("arm (a) with %s deltas, seed %d", precision, seed)
            result = bench.simulate(f"precision-{precision}-{seed}", seed, strategy=strategy, server_optimizer=optimizer,
                                    delta_precision=precision, **extra)
            result.update(arm="automatic", precision=precision, strategy=strategy, server_optimizer=optimizer)
            bench.save(key, result)


def summary(result: dict) -> dict:
    """Bytes per device and round (mean over the train rounds devices answered), final ppl."""
    per_round = [b for d in result["trace"]["devices"].values() for b in d.get("update_bytes", {}).values()]
    train = [r for r in result["rounds"] if r["kind"] == "train"]
    return {
        "update_bytes": float(np.mean(per_round)) if per_round else None,
        "download_bytes": float(np.mean([r["downlink_bytes_per_device"] for r in train])) if train else None,
        "final": result["points"][-1]["everyone"],
        "tokens": float(np.mean([r["tokens"] for r in train])) if train else None,
        "time_s": result["points"][-1]["time_s"],
        "answering": float(np.mean([len(r["answered"]) for r in train])) if train else None,
        # the planner may spend a cheaper upload on a higher rank: the rank each answering device trained
        "rank": float(np.mean([plan["rank"] for r in train for d, plan in r["plans"].items() if d in r["answered"]]
                              or [np.nan])),
    }


def markdown(results: dict) -> str | None:
    by_seed: dict[int, dict[str, dict]] = {}
    for key, result in sorted(results["runs"].items()):
        if key.startswith("precision/"):
            by_seed.setdefault(result["seed"], {})[result["precision"]] = summary(result)
    complete = {s: arms for s, arms in by_seed.items() if set(arms) == set(PRECISIONS)}
    if not complete:
        return None
    lines = ["## Delta precision in the FedPipe fleet (issue 17)", "",
             "`python benchmarks/fleet_precision.py` (results in `benchmarks/results/fleet.json`, `precision/…`): arm (a) "
             "of the FedPipe benchmark below (same fleet, data, rounds and strategy) with `--delta-precision` fp32, fp16 "
             "and int8, same seed. Update bytes are what each device's signed updates took on its link per round (chunks "
             "and framing included), the download what each device fetched of the global adapter per round.", ""]
    for seed, arms in sorted(complete.items()):
        base = arms["fp32"]
        lines += [f"Seed {seed}:", "",
                  "| precision | update per device and round | ÷ fp32 | mean rank trained | ÷ fp32 per rank | "
                  "global adapter per device and round | ÷ fp32 | final ppl, everyone's | ÷ fp32 | tokens per round | "
                  "devices answering | simulated time |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for precision in PRECISIONS:
            a = arms[precision]
            per_rank = (a["update_bytes"] / a["rank"]) / (base["update_bytes"] / base["rank"])
            lines.append(f"| {precision} | {a['update_bytes'] / 1e6:.3f} MB | {a['update_bytes'] / base['update_bytes']:.3f} | "
                         f"{a['rank']:.2f} | {per_rank:.3f} | "
                         f"{a['download_bytes'] / 1e6:.3f} MB | {a['download_bytes'] / base['download_bytes']:.3f} | "
                         f"{a['final']:.2f} | {a['final'] / base['final']:.4f} | {a['tokens']:,.0f} | {a['answering']:.1f} | "
                         f"{a['time_s']:.0f} s |")
        int8 = arms["int8"]
        ratio, quality = int8["update_bytes"] / base["update_bytes"], int8["final"] / base["final"]
        per_rank = (int8["update_bytes"] / int8["rank"]) / (base["update_bytes"] / base["rank"])
        lines += ["", f"Targets: int8 update bytes ≤ 0.27× float32's per device and round: {ratio:.3f} "
                      f"(**{'met' if ratio <= 0.27 else 'missed'}**; at the rank trained: {per_rank:.3f}, "
                      f"**{'met' if per_rank <= 0.27 else 'missed'}**). Final perplexity within 1 % of float32's: "
                      f"{quality:.4f} (**{'met' if abs(quality - 1) <= 0.01 else 'missed'}**; as a cost, at most 1 % "
                      f"worse: **{'met' if quality <= 1.01 else 'missed'}**).", ""]
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import fleet

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=["all", "report"], default="all")
    parser.add_argument("--fleet", type=Path, default=fleet.FLEET)
    parser.add_argument("--model")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--deadline", type=float)
    parser.add_argument("--devices", type=int)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--eval-blocks", type=int, default=6)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--results", type=Path, default=fleet.RESULTS)
    parser.add_argument("--docs", type=Path, default=fleet.DOCS)
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--pause-file", type=Path, help="while this file exists, wait before each device's next block "
                        "of compute (heavy work elsewhere on the machine does not skew the timings)")
    args = parser.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "edgetune.device", "edgetune_aggregator.daemon", "edgetune.trainers.torch_base",
                  "edgetune.trainers.importance", "edgetune.planning", "edgetune.models.loading"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.stage == "all":
        bench = fleet.Bench(args)
        run(bench, args.seeds)
        results = bench.results
    else:
        results = fleet.load_results(args.results)
    section = markdown(results)
    if section and not args.no_docs:
        from edgetune.bench.sections import replace_section

        begin, end = "<!-- fleet-precision:begin -->", "<!-- fleet-precision:end -->"
        replace_section(args.docs, f"{begin}\n{section}{end}\n", begin, end)
    print(section or json.dumps({k: summary(v) for k, v in results["runs"].items() if k.startswith("precision/")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
