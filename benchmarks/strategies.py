"""Aggregation strategies on a mixed-rank fleet: perplexity, bytes on the wire, server cost.

Part **a**, training: 4 devices, one ``fortunes`` category each (``benchmarks/fortunes.py``),
at ranks 2, 4, 8 and 16 of a rank-16 fleet, LoRA on q_proj and v_proj of SmolLM2-135M. Each
strategy (fedit, hetlora, stack, svd) plays R rounds of S local steps from the same initial
adapter, with the same batches on every device, so the strategies differ only in how the
deltas are merged and what each device starts from (alpha / r = 2 on every device, as the
default rank-8, alpha-16 adapter has). After every round the global model
(base + merged + s·B·A) is evaluated at rank 16 on every device's held-out entries; the table
gives the sample-weighted mean perplexity, and the payload bytes a round moves: the deltas
uplink, and the global (factors plus the frozen ``merged`` part, which stack and svd fill)
downlink to each device. Bytes are the raw float32 arrays, before the message envelope.

Part **b**, the server: time of one round's aggregation (``begin`` + N × ``add`` + ``finish``)
for N = 10, 100, 1000 synthetic updates of SmolLM2's q_proj/v_proj shapes (60 matrices), ranks
cycling 2/4/8/16 in a rank-16 fleet, and the peak memory the aggregation allocates (numpy
allocations traced by ``tracemalloc``), which should not grow with N: strategies stream. The
updates reuse 8 pre-generated random deltas in turn (generating 1000 would time the random
number generator); the start has random non-zero B, as after a few rounds. The timings are
taken with tracemalloc running and numpy's BLAS on one thread (``--blas-threads``). Usage::

    python benchmarks/strategies.py [--part a|b|both] [--rounds 3] [--steps 4]

On 2 cores part a takes about 11 minutes and part b about 6.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import tracemalloc
from datetime import date
from pathlib import Path

import numpy as np

import fortunes

log = logging.getLogger("strategies")

STRATEGIES = ("fedit", "hetlora", "stack", "svd")
RESULTS = Path(__file__).resolve().parent / "results" / "strategies.json"


# --- part a: training --------------------------------------------------------------------


def run_training(args: argparse.Namespace) -> dict:
    from edgetune.adapters.lora import init_lora
    from edgetune.wire import LoraSpec, TrainSettings
    from edgetune_aggregator.strategies import ServerOptimizerConfig, make_strategy

    fleet_rank = max(args.ranks)
    spec = LoraSpec(rank=fleet_rank, alpha=2.0 * fleet_rank, target_modules=("q_proj", "v_proj"))
    settings = TrainSettings(local_steps=args.steps, batch_size=args.batch, seq_len=args.seq_len,
                             learning_rate=args.lr, seed=args.seed)
    devices = fortunes.make_devices(args.categories, args.ranks, args.seq_len, args.eval_blocks, args.threads,
                                    args.seed)
    evaluator = next(d for d in devices if d.rank == fleet_rank)
    initial = init_lora(spec, devices[0].workload.manifest.modules, args.seed)

    started = time.perf_counter()
    round0 = fortunes.evaluate(devices, evaluator, spec, initial, {})
    log.info("round 0 (the base): mean held-out ppl %.3f", fortunes.weighted_mean(round0, devices))
    runs = {}
    for name in args.strategies:
        strategy = make_strategy(name, ServerOptimizerConfig())
        tensors, merged = initial, {}
        batches = fortunes.streams(devices, settings, args.seed)  # the same batches for every strategy
        rounds = [{"round": 0, "ppl": round0, "mean_ppl": fortunes.weighted_mean(round0, devices)}]
        for number in range(1, args.rounds + 1):
            downlink = fortunes.nbytes(tensors) + fortunes.nbytes(merged)  # the global each device receives
            merged_bytes = fortunes.nbytes(merged)
            tensors, merged, figures = fortunes.train_round(devices, spec, tensors, merged, batches, settings,
                                                            strategy, seed=args.seed + number)
            ppl = fortunes.evaluate(devices, evaluator, spec, tensors, merged)
            rounds.append({
                "round": number, "ppl": ppl, "mean_ppl": fortunes.weighted_mean(ppl, devices),
                "uplink_bytes": sum(figures["uplink_bytes"].values()),
                "downlink_bytes_per_device": downlink, "downlink_merged_bytes": merged_bytes,
                "train_s": figures["train_s"], "mean_loss": figures["mean_loss"],
            })
            log.info("%s round %d: mean held-out ppl %.3f (%.0f s of training)", name, number,
                     rounds[-1]["mean_ppl"], figures["train_s"])
        runs[name] = {"rounds": rounds, "final_global_bytes": fortunes.nbytes(tensors) + fortunes.nbytes(merged),
                      "final_merged_bytes": fortunes.nbytes(merged)}
    return {
        "devices": [{"category": d.name, "rank": d.rank, "train_entries": d.num_samples,
                     "eval_tokens": int(d.eval_blocks.size)} for d in devices],
        "settings": {"fleet_rank": fleet_rank, "alpha": spec.alpha, "rounds": args.rounds, "steps": args.steps,
                     "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr, "seed": args.seed},
        "strategies": runs,
        "wall_s": time.perf_counter() - started,
    }


def training_table(result: dict) -> str:
    runs = result["strategies"]
    rounds = len(next(iter(runs.values()))["rounds"])
    header = ["strategy"] + [f"ppl r{i}" for i in range(rounds)] + [
        "÷ fedit (last)", "uplink / round", "downlink / device, last round (merged part)", "global after last round"]
    reference = runs["fedit"]["rounds"][-1]["mean_ppl"] if "fedit" in runs else None
    rows = []
    for name, run in runs.items():
        last = run["rounds"][-1]
        rows.append([name] + [f"{r['mean_ppl']:.3f}" for r in run["rounds"]] + [
            f"{last['mean_ppl'] / reference:.3f}" if reference else "n/a",
            _mb(last["uplink_bytes"]),
            f"{_mb(last['downlink_bytes_per_device'])} ({_mb(last['downlink_merged_bytes'])})",
            _mb(run["final_global_bytes"]),
        ])
    return _markdown(header, rows)


def per_device_table(result: dict) -> str:
    """The last round's perplexity on each device's held-out entries (device rank in brackets)."""
    names = [d["category"] for d in result["devices"]]
    header = ["strategy"] + [f"{d['category']} (r{d['rank']})" for d in result["devices"]]
    base = next(iter(result["strategies"].values()))["rounds"][0]["ppl"]  # the same for every strategy
    rows = [["base (round 0)"] + [f"{base[n]:.2f}" for n in names]]
    for name, run in result["strategies"].items():
        rows.append([name] + [f"{run['rounds'][-1]['ppl'][n]:.2f}" for n in names])
    return _markdown(header, rows)


# --- part b: the server ------------------------------------------------------------------


def synthetic_round(fleet_rank: int, ranks: tuple[int, ...], pool: int, seed: int):
    """A rank-``fleet_rank`` start on SmolLM2's q/v shapes and ``pool`` deltas, ranks cycling."""
    from codec import SMOLLM2_MODULES
    from edgetune.adapters.lora import init_lora
    from edgetune.wire import LoraSpec

    rng = np.random.default_rng(seed)
    spec = LoraSpec(rank=fleet_rank, alpha=2.0 * fleet_rank, target_modules=("q_proj", "v_proj"))
    tensors = init_lora(spec, SMOLLM2_MODULES, seed)
    for name, t in tensors.items():  # B = 0 only in round 1; later rounds start from a trained B
        if name.endswith(".lora_B"):
            tensors[name] = (1e-3 * rng.standard_normal(t.shape)).astype(np.float32)
    deltas = []
    for i in range(pool):
        r = ranks[i % len(ranks)]
        deltas.append({
            name: (1e-3 * rng.standard_normal((r, t.shape[1]) if name.endswith(".lora_A") else (t.shape[0], r)))
            .astype(np.float32)
            for name, t in tensors.items()
        })
    return tensors, spec.alpha / fleet_rank, deltas


def time_aggregation(name: str, tensors: dict, scale: float, deltas: list, n: int) -> dict:
    from edgetune_aggregator.strategies import RoundStart, ServerOptimizerConfig, make_strategy

    strategy = make_strategy(name, ServerOptimizerConfig())
    start = RoundStart(dict(tensors), {}, scale, seed=0)
    tracemalloc.start()
    before, _ = tracemalloc.get_traced_memory()
    started = time.perf_counter()
    merge = strategy.begin(start)
    for i in range(n):
        merge.add(deltas[i % len(deltas)], 100 + i % 7)
    added = time.perf_counter()
    result = strategy.finish(merge)
    done = time.perf_counter()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "strategy": name, "updates": n, "seconds": done - started, "finish_s": done - added,
        "per_update_ms": 1e3 * (added - started) / n, "peak_traced_mb": (peak - before) / 1e6,
        "accumulator_mb": merge.nbytes() / 1e6,
        "global_mb": (fortunes.nbytes(result.tensors) + fortunes.nbytes(result.merged)) / 1e6,
    }


def run_server(args: argparse.Namespace) -> dict:
    tensors, scale, deltas = synthetic_round(max(args.ranks), tuple(args.ranks), 8, args.seed)
    rows = []
    for name in args.strategies:
        for n in args.updates:
            rows.append(time_aggregation(name, tensors, scale, deltas, n))
            r = rows[-1]
            log.info("%s, %d updates: %.2f s (%.2f ms per update, finish %.2f s), peak traced %.1f MB",
                     name, n, r["seconds"], r["per_update_ms"], r["finish_s"], r["peak_traced_mb"])
    return {"rows": rows, "pool": len(deltas), "delta_mb": [fortunes.nbytes(d) / 1e6 for d in deltas]}


def server_table(result: dict) -> str:
    header = ["strategy", "updates", "round s", "per update ms", "finish s", "peak traced MB", "accumulator MB"]
    rows = [[r["strategy"], f"{r['updates']:,}", f"{r['seconds']:.2f}", f"{r['per_update_ms']:.2f}",
             f"{r['finish_s']:.2f}", f"{r['peak_traced_mb']:.1f}", f"{r['accumulator_mb']:.1f}"]
            for r in result["rows"]]
    return _markdown(header, rows)


# --- output ------------------------------------------------------------------------------


def _fleet(devices: list[dict]) -> str:
    return ", ".join(f"{d['category']} r{d['rank']}" for d in devices)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _pin_blas(threads: int) -> None:
    """Restart this process with numpy's OpenBLAS at ``threads`` threads (it reads the variable
    once, when numpy loads). With its default of one thread per core, a busy 2-core machine made
    the dense steps of stack and svd 10–20× slower: the BLAS threads spin waiting for each other."""
    if os.environ.get("OPENBLAS_NUM_THREADS") != str(threads):
        env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads))
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("a", "b", "both"), default="both")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--categories", nargs="+", default=list(fortunes.DEFAULT_CATEGORIES[:4]))
    parser.add_argument("--ranks", nargs="+", type=int, default=[2, 4, 8, 16], help="one per category; "
                        "the largest is the fleet rank")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="local steps per device and round")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-blocks", type=int, default=12, help="held-out blocks per device")
    parser.add_argument("--updates", nargs="+", type=int, default=[10, 100, 1000], help="part b: fleet sizes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--blas-threads", type=int, default=1,
                        help="numpy's OpenBLAS threads (aggregation); 0: leave OpenBLAS's default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS, help="results JSON")
    args = parser.parse_args()
    if args.part != "b" and len(args.ranks) != len(args.categories):
        parser.error(f"--ranks gives {len(args.ranks)} ranks for {len(args.categories)} categories: one each")
    if args.blas_threads:
        _pin_blas(args.blas_threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("edgetune").setLevel(logging.WARNING)  # per-step and model-loading chatter

    started = time.perf_counter()
    result = {"date": date.today().isoformat(), "argv": sys.argv[1:],
              "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default")}
    if args.part in ("a", "both"):
        result["training"] = run_training(args)
    if args.part in ("b", "both"):
        result["server"] = run_server(args)
    result["wall_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    log.info("wrote %s; %.0f s in all", args.out, result["wall_s"])

    if "training" in result:
        t = result["training"]
        s = t["settings"]
        print(f"Part a: {len(t['devices'])} devices ({_fleet(t['devices'])}), "
              f"fleet rank {s['fleet_rank']}, {s['rounds']} rounds × {s['steps']} steps, batch {s['batch']} × "
              f"{s['seq_len']}, lr {s['lr']}, seed {s['seed']}; sample-weighted mean held-out perplexity "
              f"({t['wall_s']:.0f} s)\n")
        print(training_table(t) + "\n")
        print("Held-out perplexity per device after the last round:\n")
        print(per_device_table(t) + "\n")
    if "server" in result:
        print(f"Part b: aggregation of synthetic SmolLM2 q/v updates, ranks cycling {args.ranks}\n")
        print(server_table(result["server"]))


if __name__ == "__main__":
    main()
