"""The daemon's CPU per update, this checkout against an earlier commit, in the same run.

The ingest benchmark over Mosquitto (``benchmarks/aggregator.py``) measures wall-clock rates
on 2 cores shared by the broker, the publishers and the daemon, and on this shared machine the
same code varies ±25 % from run to run. This one takes the broker and the sockets out: the daemon
runs in-process on the in-memory transport, N signed SmolLM2-sized updates (LoRA r=8 q,v, 1.8 MB
each, chunked at 1 MiB as devices send them) are published pre-encoded, and what is measured is
this process's CPU time from the first publish to the N-th receipt (the daemon's whole work per
update: reassembly, signature, decode, checks, norm, journal, receipt; fsync waits are not CPU),
and the merge at the round's close (``rounds.json``). Each run is a fresh process; the two
versions alternate, ``--repeats`` times each. The baseline is checked out with ``git worktree``
into a temporary folder and removed afterwards.

    python benchmarks/ingest_cpu.py [--against e30c2af] [--devices 200] [--repeats 3] [--strategies fedit,svd]
                                    [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "ingest_cpu.json"
DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- ingest-cpu:begin -->", "<!-- ingest-cpu:end -->"


def child(n: int, strategy: str = "fedit") -> None:
    """(Run in its own process, with the checkout under test on PYTHONPATH.) One measurement, as JSON."""
    import threading
    import time
    import uuid

    from edgetune import __version__
    from edgetune.simulate import simulated_delta
    from edgetune.transport import open_transport
    from edgetune.wire import (DEFAULT_MAX_PACKET, Capabilities, Hello, LoraSpec, Presence, Topics, TrainMetrics,
                               Update, decode_message, encode_message, split_payload)
    from edgetune.wire.signing import Signer, write_key_file
    from edgetune_aggregator.daemon import Aggregator, AggregatorConfig
    from edgetune_aggregator.fleet_model import default_manifest

    try:
        from edgetune.adapters.registry import adapter_shapes
    except ImportError:  # (before adapter kinds were packages)
        from edgetune.adapters.prompt import adapter_shapes

    fleet = f"cpu{uuid.uuid4().hex[:6]}"
    topics, spec, model = Topics(fleet), LoraSpec(rank=8, target_modules=("q_proj", "v_proj")), default_manifest()
    work = Path(tempfile.mkdtemp(prefix="edgetune-ingest-cpu-"))
    devices = [f"dev-{i:04d}" for i in range(n)]
    signers = {d: Signer.generate(d) for d in devices}
    write_key_file(work / "keys.json", fleet, {d: s.public_key for d, s in signers.items()})

    def seal(device: str, topic: str, message) -> bytes:
        return encode_message(signers[device].sign(topic, encode_message(message)))

    url = f"memory://{fleet}"
    devices_side = open_transport(url, client_id="devices")
    devices_side.connect()
    for d in devices:
        devices_side.publish(topics.presence(d), encode_message(Presence(d, True)), retain=True)
        hello = Hello(d, __version__, model, Capabilities(), num_samples=10)
        devices_side.publish(topics.hello(d), seal(d, topics.hello(d), hello), retain=True)
    receipts, done = [], threading.Event()

    def on_receipt(topic: str, payload: bytes) -> None:
        receipts.append(decode_message(payload))
        if len(receipts) >= n:
            done.set()

    devices_side.subscribe(topics.receipt("+"), on_receipt)
    config = AggregatorConfig(fleet=fleet, state_dir=work / "state", rounds=1, min_devices=n, round_timeout_s=900,
                              join_timeout_s=120, adapter=spec, planning=False, evaluate_final=False,
                              device_keys=work / "keys.json", strategy=strategy)
    aggregator = Aggregator(config, open_transport(url, client_id="aggregator"))
    thread = threading.Thread(target=aggregator.serve, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while aggregator.state is None or getattr(aggregator, "task", getattr(aggregator, "_task", None)) is None:
        if time.monotonic() > deadline:
            raise RuntimeError("the daemon did not open its round")
        time.sleep(0.05)
    metrics = TrainMetrics(1.0, 0, 0.0, 1.0, 1.0)
    frames = {d: split_payload(seal(d, topics.update(d), Update(d, 1, 0, 10, simulated_delta(adapter_shapes(spec, model), d, 1),
                                                              metrics, aggregator.state.run_id)), DEFAULT_MAX_PACKET)
              for d in devices}
    cpu, wall = time.process_time(), time.monotonic()
    for d in devices:
        for frame in frames[d]:
            devices_side.publish(topics.update(d), frame)
    if not done.wait(900):
        raise RuntimeError(f"only {len(receipts)} of {n} receipts")
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    thread.join(900)
    refused = sorted({r.reason for r in receipts if not r.accepted})
    if refused:
        raise RuntimeError(f"the daemon refused updates: {refused}")
    train = next(r for r in json.loads((work / "state" / "rounds.json").read_text()) if r["kind"] == "train")
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"cpu_ms_per_update": cpu / n * 1e3, "wall_ms_per_update": wall / n * 1e3,
                      "aggregation_s": train["aggregation_s"], "status": train["status"]}))


def measure(tree: Path, n: int, strategy: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree / "sdk"), str(tree / "aggregator")]),
               OPENBLAS_NUM_THREADS="1")
    out = subprocess.run([sys.executable, __file__, "--child", str(n), strategy], env=env, capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(f"the measurement of {tree} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(against: str, n: int, repeats: int, strategies: list[str]) -> dict:
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", against], capture_output=True, text=True,
                         check=True).stdout.strip()
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    baseline = Path(tempfile.mkdtemp(prefix="edgetune-baseline-")) / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(baseline), rev], check=True,
                   capture_output=True)
    runs: dict[str, dict[str, list[dict]]] = {s: {"baseline": [], "this": []} for s in strategies}
    try:
        for i in range(repeats):
            for strategy in strategies:
                for name, tree in (("baseline", baseline), ("this", ROOT)):
                    runs[strategy][name].append(measure(tree, n, strategy))
                    print(f"{strategy} {name} run {i + 1}: {runs[strategy][name][-1]}", flush=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline)], check=False)
        shutil.rmtree(baseline.parent, ignore_errors=True)
    summary = {strategy: {name: {key: statistics.median(r[key] for r in rs)
                                 for key in ("cpu_ms_per_update", "wall_ms_per_update", "aggregation_s")}
                          for name, rs in by_tree.items()}
               for strategy, by_tree in runs.items()}
    return {"date": date.today().isoformat(), "machine": f"{os.cpu_count()} cores, Python {platform.python_version()}",
            "devices": n, "repeats": repeats, "baseline": rev, "this": head, "runs": runs, "median": summary,
            "cpu_ratio": {s: m["this"]["cpu_ms_per_update"] / m["baseline"]["cpu_ms_per_update"]
                          for s, m in summary.items()},
            "aggregation_ratio": {s: m["this"]["aggregation_s"] / m["baseline"]["aggregation_s"]
                                  for s, m in summary.items()}}


def markdown(result: dict) -> str:
    strategies = list(result["median"])
    lines = [
        BEGIN,
        "## The daemon's CPU per update, against an earlier commit",
        "",
        f"`python benchmarks/ingest_cpu.py --against {result['baseline']} --devices {result['devices']} --repeats "
        f"{result['repeats']} --strategies {','.join(strategies)} --markdown` on {result['date']} ({result['machine']}; "
        "results in `benchmarks/results/ingest_cpu.json`). The daemon in-process on the in-memory transport, "
        f"{result['devices']} signed SmolLM2-135M LoRA r=8 updates published pre-encoded and chunked as devices "
        "send them; this process's CPU time from the first publish to the last receipt (reassembly, signature, "
        "decode, checks, norm, journal, receipt), and the merge at the close (`aggregation_s`: the journal read "
        "back, weighted, merged, each update's change measured for the guard, the next global made). No broker, "
        "so none of the ±25 % run-to-run spread of the Mosquitto benchmark above. The two checkouts alternate, "
        f"medians of {result['repeats']} fresh processes each.",
        "",
        f"| strategy | checkout | CPU per update (range) | wall per update | merge of {result['devices']} updates |",
        "|---|---|---:|---:|---:|",
    ]
    for strategy in strategies:
        for name in ("baseline", "this"):
            m, rs = result["median"][strategy][name], result["runs"][strategy][name]
            low, high = min(r["cpu_ms_per_update"] for r in rs), max(r["cpu_ms_per_update"] for r in rs)
            label = f"{result[name]} ({'baseline' if name == 'baseline' else 'this'})"
            lines.append(f"| {strategy} | {label} | {m['cpu_ms_per_update']:.1f} ms ({low:.1f}–{high:.1f}) | "
                         f"{m['wall_ms_per_update']:.1f} ms | {m['aggregation_s']:.2f} s |")
    lines.append("")
    for strategy in strategies:
        lines.append(f"- {strategy}: this checkout spends {result['cpu_ratio'][strategy]:.2f}× the baseline's CPU per "
                     f"update and {result['aggregation_ratio'][strategy]:.2f}× its merge time.")
    lines.append(END)
    return "\n".join(lines)


def write_docs(section: str) -> None:
    text = DOCS.read_text()
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        marker = "<!-- communication:begin -->"
        text = text.replace(marker, section + "\n\n" + marker, 1) if marker in text else text + "\n" + section + "\n"
    DOCS.write_text(text)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return child(int(sys.argv[2]), *sys.argv[3:4])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", default="e30c2af", help="the commit to compare with (default: before issue 16)")
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--strategies", default="fedit", help="comma-separated merge strategies (default: fedit)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--markdown", action="store_true", help=f"write the section into {DOCS.relative_to(ROOT)}")
    args = parser.parse_args()
    result = run(args.against, args.devices, args.repeats, args.strategies.split(","))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    if args.markdown:
        write_docs(markdown(result))


if __name__ == "__main__":
    main()
