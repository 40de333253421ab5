"""The FedPipe benchmark: does automatic configuration make a mixed fleet learn faster and
better than one setting for all?

The fleet (``profiles/fleets/fedpipe-8.yaml``): SmolLM2-135M, 8 devices of 5 classes from
``profiles/`` (Raspberry Pi 4 gateways, Jetson Orin Nanos, Raspberry Pi 5s, an N100 mini PC, a
Xeon-D server), one Debian ``fortunes`` category each, 10 % of each held out, 30 s rounds.
Every arm runs in the fleet simulator (``edgetune.sim``): real training of every device, the
real daemon, simulated time (each device's measured compute scaled to its class's speed, its
traffic to its link's bandwidth). Same data, same seeds for every arm:

- **automatic** (a): what edgetune does by default: every device sends its profile, the
  planner picks each one's rank, base precision, batch and steps for the deadline, a
  calibration round picks the layout (importance), the default strategy merges.
- **weakest** (b): the one configuration (rank, precision, batch, steps) that every device can
  run within its memory and the deadline, fixed q,v layout, fedit.
- **uniform** (c): r=8 on q,v, batch 4, 8 steps for all, fedit; devices it does not fit in
  memory sit out, devices too slow for it miss the rounds.
- **centralized** (d): one LoRA (r=8, q,v) trained on the union of the devices' training text,
  as many tokens per round as (a) trained: the upper bound on quality.
- **local** (e): each device alone (edgetune's automation, a fleet of one), scored on its own
  held-out text and on everyone's.

Every global adapter version of every arm is scored here, on the same held-out blocks of every
device (``--eval-blocks`` per device): perplexity per device, and on everyone's held-out text
(exp of the token-weighted mean NLL). The time axis is the simulated wall clock of the round
log. A **sweep** runs arm (a) with every strategy (FedAvg on the server) and then with every
server optimizer that applies (seed 0). The arms use the sweep's best (strategy, server
optimizer); every federated arm has that server optimizer (a device alone, arm (e), has no
server: FedAvg, its adapter goes on from where it was), and ``--strategy auto`` and the daemon's
default server optimizer are what the whole sweep found best (the report says whether they
still are). Runs made before the server default changed are kept under ``fedavg-server/``.

Usage::

    python benchmarks/fleet.py                          # sweep, arms, docs (about 9 hours on 2 cores)
    python benchmarks/fleet.py --stage sweep|arms|report
    python benchmarks/fleet.py --model tiny-llama --rounds 2 --seeds 0 --results /tmp/f.json  # a smoke run

Results are saved after every run (``benchmarks/results/fleet.json``) and a run already there
is not repeated, so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FLEET = ROOT / "profiles" / "fleets" / "fedpipe-8.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "fleet.json"
DOCS = ROOT / "docs" / "benchmarks.md"
IMAGES = ROOT / "docs" / "images"
log = logging.getLogger("fleet")

#: (strategy, server optimizer, its settings): one untuned setting per optimizer, chosen so a
#: round's server step is about the size of the devices' own (docs/benchmarks.md says more)
SWEEP = (
    ("fedit", "fedavg", {}), ("hetlora", "fedavg", {}), ("stack", "fedavg", {}), ("svd", "fedavg", {}),
    ("fedit", "fedavgm", {"server_lr": 1.0, "server_momentum": 0.5}),
    ("hetlora", "fedavgm", {"server_lr": 1.0, "server_momentum": 0.5}),
    ("stack", "fedavgm", {"server_lr": 1.0, "server_momentum": 0.5}),
    ("svd", "fedavgm", {"server_lr": 1.0, "server_momentum": 0.5}),
    ("fedit", "fedadam", {"server_lr": 3e-3}), ("hetlora", "fedadam", {"server_lr": 3e-3}),
    ("fedit", "fedyogi", {"server_lr": 3e-3}), ("hetlora", "fedyogi", {"server_lr": 3e-3}),
)
ARMS = ("automatic", "weakest", "uniform", "centralized", "local")


# --- scoring --------------------------------------------------------------------------------


class Evaluator:
    """Scores an adapter on every device's held-out blocks, with one model of its own."""

    def __init__(self, model: str | None, workloads: dict, seq_len: int, blocks: int):
        from edgetune.models import load_model
        from edgetune.workload import Workload

        self.workload = Workload(load_model(model), [], [], model_ref=model or "default")
        self.heldout = {d: w.heldout_blocks(seq_len)[:blocks] for d, w in workloads.items()}

    def score(self, spec, tensors: dict, merged: dict) -> dict:
        """``{"devices": {id: ppl}, "everyone": ppl}`` of base + merged + the adapter."""
        trainer = self.workload.trainer(spec)
        trainer.set_adapter({k: np.asarray(v, np.float32) for k, v in tensors.items()})
        trainer.set_merged(merged)
        per_device, nll, tokens = {}, 0.0, 0
        for device, blocks in self.heldout.items():
            ppl = trainer.perplexity(blocks)
            count = blocks.shape[0] * (blocks.shape[1] - 1)
            per_device[device] = round(ppl, 4)
            nll, tokens = nll + math.log(ppl) * count, tokens + count
        return {"devices": per_device, "everyone": round(math.exp(nll / tokens), 4)}


def curve(state_dir: Path, evaluator: Evaluator, every: int = 1) -> list[dict]:
    """Every ``every``-th global version (and the last) with its simulated time and scores."""
    from edgetune_aggregator.store import StateStore

    store = StateStore(state_dir)
    rounds = store.rounds()
    t0 = min((r["started_at"] for r in rounds), default=0.0)
    made = {r["new_version"]: r for r in rounds if r.get("new_version") is not None}
    last = max(made, default=0)
    points = []
    for version in range(0, last + 1):
        if version % every and version != last:
            continue
        adapter = store.load_global(version)
        record = made.get(version)
        when = 0.0 if record is None else record["started_at"] + record["duration_s"] - t0
        points.append({"version": version, "time_s": round(when, 2), **evaluator.score(adapter.adapter, adapter.tensors,
                                                                                        adapter.merged)})
    return points


def round_summaries(rounds: list[dict]) -> list[dict]:
    out = []
    for r in rounds:
        if r["kind"] not in ("train", "calibrate"):
            continue
        answered = [d["device_id"] for d in r["devices"]]
        out.append({
            "round": r["round"], "kind": r["kind"], "status": r["status"], "duration_s": round(r["duration_s"], 2),
            "asked": r.get("asked", []), "answered": answered,
            "missed": sorted(set(r.get("asked", [])) - set(answered)),
            "excluded": r.get("excluded", {}), "declined": r.get("declined", {}),
            "tokens": sum(d.get("train_tokens", 0) for d in r["devices"]),
            "uplink_bytes": sum(d.get("bytes_sent", 0) for d in r["devices"]),
            "downlink_bytes_per_device": r.get("downlink_bytes", 0),
            "truncation_error": r.get("truncation_error"),
            "plans": r.get("plans", {}),
        })
    return out


# --- the arms -------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace):
        from edgetune.sim import build_workloads, load_fleet

        self.args = args
        spec = load_fleet(args.fleet)
        self.spec = dataclasses.replace(spec, rounds=args.rounds or spec.rounds,
                                        deadline_s=args.deadline or spec.deadline_s,
                                        model=args.model if args.model is not None else spec.model)
        if args.devices:
            self.spec = dataclasses.replace(self.spec, devices=self.spec.devices[: args.devices])
        self.results = load_results(args.results)
        log.info("loading %d devices' models and text", len(self.spec.devices))
        self.workloads = build_workloads(self.spec, args.threads)
        self.speed = PausableSpeed(args.threads, pause_file=args.pause_file)
        self.evaluator = Evaluator(self.spec.model, self.workloads, self.spec.seq_len, args.eval_blocks)
        self.scratch = Path(tempfile.mkdtemp(prefix="edgetune-fleet-"))

    def save(self, key: str, run: dict) -> None:
        self.results["runs"][key] = run
        self.results["fleet"] = {"file": str(Path(self.args.fleet).resolve().relative_to(ROOT))
                                 if Path(self.args.fleet).resolve().is_relative_to(ROOT) else str(self.args.fleet),
                                 "rounds": self.spec.rounds, "deadline_s": self.spec.deadline_s,
                                 "model": self.spec.model or "default", "eval_blocks": self.args.eval_blocks,
                                 "devices": {d.device_id: {"class": d.profile.name, "data": d.data,
                                                           "train_samples": self.workloads[d.device_id].num_samples}
                                             for d in self.spec.devices}}
        self.results.setdefault("machine", machine())
        atomic_json(self.args.results, self.results)

    def simulate(self, key: str, seed: int, plan: bool = True, devices=None, every: int = 1, spec=None,
                 **overrides) -> dict:
        from edgetune.sim import Simulation

        out = self.scratch / key.replace("/", "_")
        shutil.rmtree(out, ignore_errors=True)
        spec = dataclasses.replace(spec or self.spec, seed=seed)
        started = time.monotonic()
        result = Simulation(spec, out, workloads=self.workloads, speed=self.speed, threads=self.args.threads,
                            plan=plan, devices=devices, **overrides).run()
        points = curve(result.state_dir, self.evaluator, every)
        run = {"seed": seed, "overrides": {k: v for k, v in overrides.items() if not isinstance(v, Path)},
               "points": points, "rounds": round_summaries(result.rounds), "virtual_s": round(result.duration_s, 1),
               "wall_s": round(time.monotonic() - started, 1), "trace": _small_trace(result.trace),
               "commit": commit()}
        shutil.rmtree(out, ignore_errors=True)
        return run

    def automatic(self, seed: int, strategy: str, optimizer: str, extra: dict) -> dict:
        return self.simulate(f"auto-{strategy}-{optimizer}-{seed}", seed, strategy=strategy,
                             server_optimizer=optimizer, **extra)

    def weakest(self, seed: int, optimizer: str, extra: dict) -> dict:
        return self.simulate(f"weakest-{seed}", seed, strategy="fedit", plan_mode="weakest", layout="fixed",
                             server_optimizer=optimizer, **extra)

    def uniform(self, seed: int, optimizer: str, extra: dict) -> dict:
        return self.simulate(f"uniform-{seed}", seed, strategy="fedit", plan_mode="uniform", layout="fixed",
                             server_optimizer=optimizer, **extra)

    def local(self, seed: int, strategy_of_a: str) -> dict:
        """Each device alone: a fleet of one, edgetune's automation (planner, layout), fedit
        (with one device the merge is the device's own adapter)."""
        runs = {}
        for device in self.spec.devices:
            spec = dataclasses.replace(self.spec, name=f"local-{device.device_id}")
            sim = self.simulate(f"local-{device.device_id}-{seed}", seed, devices=[device],
                                every=max(1, self.spec.rounds // 2), strategy="fedit", spec=spec,
                                server_optimizer="fedavg")
            runs[device.device_id] = sim
        return {"seed": seed, "devices": runs}

    def centralized(self, seed: int, tokens_per_round: float) -> dict:
        """One LoRA on the union of the training text, ``tokens_per_round`` a round."""
        from edgetune.wire import LoraSpec, TrainSettings

        spec = LoraSpec(rank=self.spec.rank, alpha=self.spec.alpha, target_modules=self.spec.targets)
        union = self.evaluator.workload  # (its own model: train on it, then score it)
        blocks = np.concatenate([w._packed("train", self.spec.seq_len) for w in self.workloads.values()])
        batch = 8
        steps = max(1, round(tokens_per_round / (batch * self.spec.seq_len)))
        from edgetune.adapters.lora import init_lora

        trainer = union.trainer(spec)
        tensors = init_lora(spec, union.manifest.modules, seed)
        trainer.set_adapter(tensors)
        trainer.set_merged({})
        sampler = union.batches_from(blocks, batch, seed)
        points = [{"version": 0, "round": 0, **self.evaluator.score(spec, tensors, {})}]
        started = time.monotonic()
        for r in range(1, self.spec.rounds + 1):
            settings = TrainSettings(local_steps=steps, batch_size=batch, seq_len=self.spec.seq_len,
                                     learning_rate=self.spec.learning_rate, seed=seed + r)
            trainer = union.trainer(spec)
            trainer.train(sampler, settings)
            tensors = trainer.get_adapter()
            points.append({"version": r, "round": r, **self.evaluator.score(spec, tensors, {})})
            log.info("centralized seed %d round %d: ppl %.2f", seed, r, points[-1]["everyone"])
        return {"seed": seed, "steps_per_round": steps, "batch": batch, "tokens_per_round": steps * batch * self.spec.seq_len,
                "points": points, "wall_s": round(time.monotonic() - started, 1)}


def _pausable():
    from edgetune.sim import MachineSpeed

    class PausableSpeed(MachineSpeed):
        """Waits before a device's block of compute while ``pause_file`` exists: the simulated
        times assume the machine does nothing else, so other heavy work on it can wait for a
        pause between two blocks instead of slowing one down."""

        def __init__(self, threads, pause_file: Path | None = None):
            super().__init__(threads)
            self.pause_file = pause_file

        def before_compute(self, dtype: str) -> None:
            if self.pause_file is not None and self.pause_file.exists():
                log.info("paused (%s exists)", self.pause_file)
                while self.pause_file.exists():
                    time.sleep(2)
                log.info("resumed")
            super().before_compute(dtype)

    return PausableSpeed


def PausableSpeed(threads, pause_file=None):  # noqa: N802 (a class made lazily: no torch at import)
    return _pausable()(threads, pause_file)


def _small_trace(trace: dict) -> dict:
    """What the report needs of the simulation trace: per device, class and compute per block,
    and the bytes of the updates it sent (signed, as they crossed its link)."""
    return {"machine_gflops": trace.get("machine_gflops"),
            "devices": {d: {"class": v["class"], "slowdown_float32": v["slowdown_float32"],
                            "upload_s": v["upload_s"], "download_s": v["download_s"],
                            "compute_s": round(sum(b["seconds"] for b in v["compute"]), 2),
                            "update_bytes": _per_round(s for s in v.get("sent", []) if s["topic"] == "update"),
                            "received_bytes": v.get("received_bytes", 0)}
                        for d, v in trace.get("devices", {}).items()}}


def _per_round(sent) -> dict[str, int]:
    """Bytes sent per round (an update over one packet goes as several chunks; a resend counts)."""
    out: dict[str, int] = {}
    for s in sent:
        out[str(s["round"])] = out.get(str(s["round"]), 0) + s["bytes"]
    return out


# --- stages ---------------------------------------------------------------------------------


def sweep_key(strategy: str, optimizer: str, seed: int) -> str:
    return f"sweep/{strategy}+{optimizer}/seed{seed}"


def run_sweep(bench: Bench, optimizers: tuple[str, ...] | None = None) -> None:
    seed = bench.args.seeds[0]
    for strategy, optimizer, extra in SWEEP:
        if bench.args.strategies and strategy not in bench.args.strategies:
            continue
        if optimizers is not None and optimizer not in optimizers:
            continue
        if bench.args.optimizers and optimizer not in bench.args.optimizers:
            continue
        key = sweep_key(strategy, optimizer, seed)
        if key in bench.results["runs"]:
            continue
        log.info("sweep: %s + %s, seed %d", strategy, optimizer, seed)
        run = bench.automatic(seed, strategy, optimizer, extra)
        run.update(strategy=strategy, server_optimizer=optimizer, server_settings=extra)
        bench.save(key, run)
        log.info("sweep: %s + %s final ppl %.2f (%.0f s)", strategy, optimizer, run["points"][-1]["everyone"],
                 run["wall_s"])


def sweep_winner(results: dict) -> tuple[str, str, dict] | None:
    """The sweep's best (strategy, optimizer, settings) by final perplexity on everyone's data."""
    runs = [r for k, r in results["runs"].items() if k.startswith("sweep/")]
    if not runs:
        return None
    best = min(runs, key=lambda r: r["points"][-1]["everyone"])
    return best["strategy"], best["server_optimizer"], best.get("server_settings", {})


def run_arms(bench: Bench) -> None:
    winner = sweep_winner(bench.results)
    if winner is None:
        raise SystemExit("run the sweep first (--stage sweep): the arms use its winner")
    strategy, optimizer, extra = winner
    bench.results["winner"] = {"strategy": strategy, "server_optimizer": optimizer, "server_settings": extra}
    for seed in bench.args.seeds:
        for arm in ARMS:
            if bench.args.arms and arm not in bench.args.arms:
                continue
            key = f"{arm}/seed{seed}"
            if key in bench.results["runs"]:
                continue
            log.info("arm %s, seed %d", arm, seed)
            # (a) runs again rather than reusing the sweep's run of the same setting: the sweep
            # may be older than the code the arms measure (its commit is in each run)
            if arm == "automatic":
                run = bench.automatic(seed, strategy, optimizer, extra)
            elif arm == "weakest":
                run = bench.weakest(seed, optimizer, extra)
            elif arm == "uniform":
                run = bench.uniform(seed, optimizer, extra)
            elif arm == "centralized":
                auto = bench.results["runs"].get(f"automatic/seed{seed}")
                if auto is None:
                    raise SystemExit("the centralized arm trains as many tokens as the automatic one: run that first")
                tokens = np.mean([r["tokens"] for r in auto["rounds"] if r["kind"] == "train"])
                run = bench.centralized(seed, float(tokens))
            else:
                run = bench.local(seed, strategy)
            run["arm"] = arm
            if arm == "automatic":
                run.update(strategy=strategy, server_optimizer=optimizer, server_settings=extra)
            elif arm in ("weakest", "uniform"):
                run.update(strategy="fedit", server_optimizer=optimizer, server_settings=extra)
            bench.save(key, run)


def run_ablation(bench: Bench) -> None:
    """Arm (a) with the fixed q,v layout instead of the importance layout (seed 0, the arms'
    strategy): what the calibration round buys, for the default ``--layout``."""
    winner = bench.results.get("winner") or {}
    if not winner:
        raise SystemExit("run the arms first: the ablation uses their strategy")
    seed = bench.args.seeds[0]
    key = f"ablation/fixed-layout/seed{seed}"
    if key in bench.results["runs"]:
        return
    log.info("ablation: fixed layout, seed %d", seed)
    run = bench.simulate(f"ablation-fixed-{seed}", seed, strategy=winner["strategy"],
                         server_optimizer=winner["server_optimizer"], layout="fixed", **winner.get("server_settings", {}))
    run.update(arm="automatic, fixed layout", strategy=winner["strategy"], server_optimizer=winner["server_optimizer"])
    bench.save(key, run)


# --- headlines ------------------------------------------------------------------------------


def time_to_reach(points: list[dict], target: float) -> float | None:
    """The simulated time at which a curve first gets to ``target`` (linear between points)."""
    for before, after in zip(points, points[1:]):
        if after["everyone"] <= target:
            if before["everyone"] <= target:
                return before["time_s"]
            f = (before["everyone"] - target) / (before["everyone"] - after["everyone"])
            return before["time_s"] + f * (after["time_s"] - before["time_s"])
    return None


def headlines(results: dict) -> dict:
    runs = results["runs"]
    seeds = sorted({int(k.rsplit("seed", 1)[1]) for k in runs if k.startswith("automatic/")})
    out = {"seeds": seeds, "per_seed": {}}
    for seed in seeds:
        a, b = runs.get(f"automatic/seed{seed}"), runs.get(f"weakest/seed{seed}")
        c, d = runs.get(f"uniform/seed{seed}"), runs.get(f"centralized/seed{seed}")
        e = runs.get(f"local/seed{seed}")
        row = {"a_final": a["points"][-1]["everyone"]}
        for name, other in (("b", b), ("c", c)):
            if other is None:
                continue
            target, t_other = other["points"][-1]["everyone"], other["points"][-1]["time_s"]
            t_a = time_to_reach(a["points"], target)
            row[f"{name}_final"] = target
            row[f"{name}_time_s"] = t_other
            row[f"a_time_to_{name}_s"] = t_a
            row[f"speedup_vs_{name}"] = (t_other / t_a) if t_a else None
        if d is not None:
            row["d_final"] = d["points"][-1]["everyone"]
            row["a_over_d"] = row["a_final"] / row["d_final"]
        if e is not None:
            finals = {dev: r["points"][-1] for dev, r in e["devices"].items()}
            row["e_everyone_mean"] = float(np.mean([p["everyone"] for p in finals.values()]))
            row["e_own_mean"] = float(np.mean([p["devices"][dev] for dev, p in finals.items()]))
            a_devices = a["points"][-1]["devices"]
            row["a_own_mean"] = float(np.mean([a_devices[dev] for dev in finals]))
            row["a_over_e_everyone"] = row["a_final"] / row["e_everyone_mean"]
            row["a_over_e_own"] = row["a_own_mean"] / row["e_own_mean"]
        out["per_seed"][seed] = row
    return out


#: where runs of the arms made with FedAvg on the server (before it stopped being the default) are kept
EARLIER = "fedavg-server/"


def earlier_results(results: dict) -> dict | None:
    """The arms as first run, with FedAvg on the server, beside the same (d) and (e) (whose runs do
    not depend on the server optimizer): what the change of default bought."""
    runs = {k[len(EARLIER):]: r for k, r in results["runs"].items() if k.startswith(EARLIER)}
    if not any(k.startswith("automatic/") for k in runs):
        return None
    for key, run in results["runs"].items():
        if key.startswith(("centralized/", "local/")):
            runs.setdefault(key, run)
    return {**results, "runs": runs}


def defaults_agree(results: dict) -> dict:
    """Whether the daemon's defaults for a planned fleet are the sweep's best: ``--strategy
    auto`` (as ``AggregatorConfig`` resolves it when planning) and the default server optimizer
    with its settings."""
    from edgetune_aggregator.config import AggregatorConfig
    from edgetune_aggregator.strategies import ServerOptimizerConfig

    config = AggregatorConfig(fleet="check", state_dir=Path("unused"))
    default = {"strategy": config.strategy_name, **dataclasses.asdict(config.server_optimizer)}
    winner = sweep_winner(results)
    if winner is None:
        return {"default": default, "winner": None, "agree": None}
    strategy, optimizer, extra = winner
    best = {"strategy": strategy, **dataclasses.asdict(ServerOptimizerConfig(
        optimizer, float(extra.get("server_lr", 1.0)), extra.get("server_momentum")))}
    agree = all(best[k] == default[k] for k in ("strategy", "name", "lr")) and (
        optimizer == "fedavg" or math.isclose(best["momentum"], default["momentum"]))
    return {"default": default, "winner": best, "agree": agree}


def spread(values: list[float | None], fmt: str = "{:.2f}") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(float(np.mean(values)))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


# --- the doc --------------------------------------------------------------------------------


#: the seeds the issue's headlines are defined over (``--seeds`` default)
PLANNED_SEEDS = (0, 1, 2)


def coverage(results: dict) -> str:
    """What the results hold of the full benchmark, and what they lack: a partial run says so."""
    runs = results["runs"]
    missing = []
    for seed in PLANNED_SEEDS:
        arms = [arm for arm in ARMS if f"{arm}/seed{seed}" not in runs]
        if arms:
            missing.append(f"seed {seed}: " + ("every arm" if len(arms) == len(ARMS) else ", ".join(arms)))
    sweep_missing = [f"{s}+{o}" for s, o, _ in SWEEP if sweep_key(s, o, PLANNED_SEEDS[0]) not in runs]
    note = ""
    if not any(k.startswith("ablation/") for k in runs):
        if any(k.startswith(EARLIER + "ablation/") for k in runs):
            note = " (The layout ablation: with FedAvg on the server only, run before FedAvgM became the default.)"
        else:
            sweep_missing.append("the layout ablation")
    if not missing and not sweep_missing:
        return "Complete: every arm for every seed, the whole sweep and the ablation." + note
    parts = []
    if missing:
        parts.append("arms (" + "; ".join(missing) + ")")
    if sweep_missing:
        parts.append("sweep (" + ", ".join(sweep_missing) + ")")
    return ("**Partial run.** Not yet measured: " + "; ".join(parts) + ". Headlines below are over the seeds present only."
            + note)


def write_docs(results: dict, docs: Path, images: Path) -> None:
    from edgetune.bench.sections import replace_section

    import fleet_plots

    images.mkdir(parents=True, exist_ok=True)
    fleet_plots.plot_all(results, images)
    earlier = earlier_results(results)
    section = fleet_plots.markdown(results, headlines(results), spread, coverage(results),
                                   earlier=headlines(earlier) if earlier else None, defaults=defaults_agree(results))
    replace_section(docs, section, "<!-- fleet:begin -->", "<!-- fleet:end -->")


def commit() -> str:
    """The code a run measured: the checkout's commit, ``+dirty`` if the code differs from it
    (the results file this benchmark writes is not code: it does not count)."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=30).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--", "sdk", "aggregator", "profiles", "benchmarks",
                                  f":(exclude){RESULTS.relative_to(ROOT)}"], cwd=ROOT, capture_output=True,
                                 text=True, timeout=30).stdout.strip()
        return (head or "unknown") + ("+dirty" if changed else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> dict:
    import os
    import platform

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine(),
            "date": date.today().isoformat()}


def load_results(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"runs": {}}


def atomic_json(path: Path, data: dict) -> None:
    from edgetune.atomic import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=["all", "sweep", "arms", "ablation", "report"], default="all")
    parser.add_argument("--fleet", type=Path, default=FLEET)
    parser.add_argument("--model", help="override the fleet file's model (e.g. tiny-llama for a smoke run)")
    parser.add_argument("--rounds", type=int, help="override the fleet file's rounds")
    parser.add_argument("--deadline", type=float, help="override the fleet file's deadline_s")
    parser.add_argument("--devices", type=int, help="only the first N devices (smoke runs)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--arms", default="", help="comma-separated subset of " + ",".join(ARMS))
    parser.add_argument("--strategies", default="", help="comma-separated subset of the sweep's strategies")
    parser.add_argument("--optimizers", default="", help="comma-separated subset of the sweep's server optimizers")
    parser.add_argument("--eval-blocks", type=int, default=6, help="held-out blocks per device each version is scored on")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--docs", type=Path, default=DOCS, help="where the section goes (--no-docs: nowhere)")
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--images", type=Path, default=IMAGES)
    parser.add_argument("--pause-file", type=Path, help="while this file exists, wait before each device's next "
                        "block of compute (to run something heavy on the machine without skewing the timings)")
    args = parser.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.arms = [a for a in args.arms.split(",") if a]
    args.strategies = [s for s in args.strategies.split(",") if s]
    args.optimizers = [s for s in args.optimizers.split(",") if s]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "edgetune.device", "edgetune_aggregator.daemon", "edgetune.trainers.torch_base",
                  "edgetune.trainers.importance", "edgetune.planning", "edgetune.models.loading"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.stage != "report":
        bench = Bench(args)
        if args.stage == "all":  # the strategies first, the arms with their winner, then the optimizers
            run_sweep(bench, optimizers=("fedavg",))
            run_arms(bench)
            run_sweep(bench)
            run_ablation(bench)
        elif args.stage == "sweep":
            run_sweep(bench)
        elif args.stage == "ablation":
            run_ablation(bench)
        else:
            run_arms(bench)
        results = bench.results
    else:
        results = load_results(args.results)
    if not args.no_docs and any(k.startswith("automatic/") for k in results["runs"]):
        write_docs(results, args.docs, args.images)
    print(json.dumps(headlines(results) if any(k.startswith("automatic/") for k in results["runs"]) else {}, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
