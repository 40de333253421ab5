"""``edgetune demo``: a whole federation on one machine, with the real parts.

An embedded MQTT broker (or ``--broker``), the aggregator daemon on a thread of this process,
and one OS process per device running ``edgetune device run`` — the same command a real
device runs. Progress bars follow the devices' progress messages over the broker; a table
per round shows loss, held-out perplexity and bytes; the result is a PEFT adapter folder.

With ``--ort-devices K`` the last K devices train with ONNX Runtime instead of PyTorch: the
demo builds the artifacts once (``edgetune build-ort``), the aggregator serves them, and those
devices download them over the broker before they join (docs/ort.md).

Each device also gets the other devices' held-out records as its robustness set, so every round
shows both scores (own held-out data, others'). ``--adapter prompt`` trains a soft prompt instead
of LoRA; ``--personalize`` runs ``edgetune device personalize`` on every device after the last
round and shows what it gained and what it cost (docs/personalization.md).

It is one of the few ``edgetune`` modules that import ``edgetune_aggregator``, on purpose: it runs
both sides in one process (``tests/test_layering.py`` lists them).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from .adapters.registry import adapter_kind

log = logging.getLogger(__name__)

FLEET = "demo"
#: the device classes (profiles/) the demo's devices emulate, in turn: memory and speed budgets
#: the planner plans for and the devices keep to (``edgetune device run --emulate``)
CLASSES = ("raspberry-pi-4-4gb-gateway", "jetson-orin-nano-8gb", "intel-n100-16gb", "raspberry-pi-5-8gb",
           "xeon-d-8core-32gb")


def fleet_manifest(model: str | None, model_dir: str):
    """The demo is the fleet's operator: it pins the daemon to the model its devices load
    (docs/security.md), as ``--model-manifest`` does for a deployed daemon. For the default
    model that is the daemon's own default pin (None here: ``fleet_model.py``); another model is
    loaded once to read its manifest."""
    if model is None:
        return None
    from .models import load_model

    return load_model(model_dir).manifest


def run_demo(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from edgetune_aggregator.daemon import Aggregator, AggregatorConfig

    from .logfile import log_details_to_file
    from .data import discover_device_files, write_demo_data
    from .models import prepare_model
    from .transport import open_transport
    from .transport.channel import Channel
    from .wire import Progress, Topics, TrainSettings

    out: Path = args.out.resolve()
    if (out / "state").exists():
        raise ValueError(f"{out} holds an earlier demo run: remove it or pass --out elsewhere")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    log_details_to_file(out / "logs" / "demo.log")
    if args.data:
        files = discover_device_files(args.data)
    else:
        paths = write_demo_data(out / "data", args.devices)
        files = {f"line-{i + 1}": p for i, p in enumerate(paths)}
    print(f"edgetune demo: {len(files)} devices, {args.rounds} rounds; output in {out}")

    t0 = time.monotonic()
    model_dir, model_name = prepare_model(args.model)  # convert a GGUF once, not per device
    print(f"model {model_name} ready in {time.monotonic() - t0:.1f} s")

    if not 0 <= args.ort_devices <= len(files):
        raise ValueError(f"--ort-devices must be between 0 and the {len(files)} devices")
    # the kind's own defaults: LoRA r=8, alpha 16 on q_proj, v_proj; a 20-token prompt from vocabulary embeddings
    spec = adapter_kind(getattr(args, "adapter", "lora")).spec_class()
    ort_devices = set(sorted(files)[len(files) - args.ort_devices:]) if args.ort_devices else set()
    artifacts = None
    if ort_devices:
        from .ort.build import build_artifacts

        t1 = time.monotonic()
        artifacts = out / "ort-artifacts"
        build_artifacts(str(model_dir), artifacts, spec=spec, force=True)
        print(f"ONNX Runtime artifacts for {', '.join(sorted(ort_devices))} built in {time.monotonic() - t1:.1f} s")

    broker = None
    if args.broker:
        url = args.broker
    else:
        from .transport.embedded_broker import EmbeddedBroker

        broker = EmbeddedBroker().start()
        url = broker.url
        print(f"embedded MQTT broker at {url}")

    # The downlink signed, as a provisioned fleet's is: a fleet key made for this demo; every
    # device verifies tasks and adapters with its public half (docs/security.md)
    from .atomic import atomic_write_bytes
    from .wire.signing import FleetSigner

    fleet_key = FleetSigner.generate()
    (out / "keys").mkdir(exist_ok=True)
    atomic_write_bytes(out / "keys" / "fleet.key", fleet_key.private_pem())  # (0600 from the start)
    atomic_write_bytes(out / "keys" / "fleet.pub", fleet_key.public_pem())
    print(f"tasks and adapters signed with a fleet key made for this demo; devices verify them ({out / 'keys'})")

    plan = not getattr(args, "no_plan", False)
    classes = device_classes(sorted(files), getattr(args, "classes", None)) if plan else {}
    if classes:
        classes = fair_shares(classes, out / "devices", threads=max(1, (os.cpu_count() or 1) // len(files)))
    config = AggregatorConfig(
        fleet=FLEET,
        state_dir=out / "state",
        rounds=args.rounds,
        # every device joins before round 1; a round closes once all it asked answered, or at the
        # deadline with those that did (a slow device can miss one)
        start_devices=len(files),
        min_devices=1,
        quorum=1.0,
        round_timeout_s=getattr(args, "deadline", 900.0),
        join_timeout_s=600,
        adapter=spec,
        train=TrainSettings(local_steps=args.steps, batch_size=4, seq_len=128, learning_rate=2e-3,
                            eval_blocks=getattr(args, "eval_blocks", 16)),
        base_model=model_name,
        model=fleet_manifest(args.model, model_dir),
        admit=frozenset(files),  # the demo's own devices: nobody else holds a round open
        fleet_key=out / "keys" / "fleet.key",
        ort_artifacts=artifacts,
        linger_s=None if getattr(args, "personalize", False) else 0.0,  # stopped once all have personalized
    )
    robustness = write_robustness_sets(files, out / "robustness")
    bars: dict[str, tqdm] = {}
    bars_lock = threading.Lock()

    def on_round(record) -> None:
        with bars_lock:
            for bar in bars.values():
                bar.close()
            bars.clear()
            tqdm.write(format_round(record))

    shown_plans: dict = {}

    def on_task(task, record) -> None:
        if task.kind.value not in ("train", "calibrate") or not (record.plans or record.excluded):
            return
        plans = {d: {k: v for k, v in p.items() if not k.startswith("predicted")} for d, p in record.plans.items()}
        if (plans, record.excluded) == shown_plans.get("last"):
            return
        shown_plans["last"] = (plans, record.excluded)
        with bars_lock:
            tqdm.write(format_plans(record, aggregator, classes))

    transport = open_transport(url, client_id="edgetune-demo-aggregator", clean_session=False)
    aggregator = Aggregator(config, transport, on_round=on_round, on_task=on_task)
    daemon = threading.Thread(target=aggregator.serve, name="aggregator", daemon=True)
    daemon.start()

    # Progress bars fed by the devices' progress messages, as a dashboard would be.
    topics = Topics(FLEET)
    watcher = open_transport(url, client_id="edgetune-demo-watcher")
    watcher.connect()

    def on_progress(topic: str, progress: Progress) -> None:
        with bars_lock:
            key = progress.device_id
            bar = bars.get(key)
            if bar is None or bar.desc != f"{key} round {progress.round}":
                if bar is not None:
                    bar.close()
                bar = bars[key] = tqdm(total=progress.total_steps, desc=f"{key} round {progress.round}",
                                       position=sorted(files).index(key) if key in files else 0,
                                       leave=False, unit="step")
            bar.update(progress.step - bar.n)
            bar.set_postfix(loss=f"{progress.loss:.3f}")

    Channel(watcher, topics.sender_of).subscribe(topics.all_devices("progress"), on_progress, qos=0)

    threads = max(1, (os.cpu_count() or 1) // len(files))

    def device_command(command: str, device_id: str, path: Path, log_name: str) -> list[str]:
        cmd = [sys.executable, "-m", "edgetune", "device", command, "--broker", url, "--fleet", FLEET,
               "--device-id", device_id, "--data", str(path), "--model", str(model_dir),
               "--threads", str(threads), "--log-file", str(out / "logs" / log_name),
               "--robustness", str(robustness[device_id]), "--fleet-key", str(out / "keys" / "fleet.pub")]
        if command == "run":  # its measured profile is kept in its own state dir
            cmd += ["--state-dir", str(out / "devices" / device_id)]
            cmd += ["--emulate", str(classes[device_id])] if device_id in classes else ["--no-plan"]
        if device_id in ort_devices:  # starts empty: downloads the artifacts from the aggregator
            cmd += ["--trainer", "ort", "--artifacts", str(out / "devices" / device_id / "artifacts")]
        else:
            cmd += ["--trainer", "torch"]
        return cmd

    procs = {}
    # One at a time: each device measures this machine when it starts, which others would disturb.
    for device_id, path in files.items():
        procs[device_id] = subprocess.Popen(device_command("run", device_id, path, f"{device_id}.log"),
                                            stdin=subprocess.DEVNULL)
        _wait_for_hello(aggregator, device_id, procs[device_id], timeout=600)
        where = f" as {classes[device_id].stem}" if device_id in classes else " (not planned)"
        print(f"  {device_id} joined{where}")
    kinds = f", {len(ort_devices)} of them with ONNX Runtime" if ort_devices else ""
    print(f"started {len(procs)} device processes ({threads} thread(s) each{kinds}); logs in {out / 'logs'}")

    failed = None
    personalizing = False
    log_suffix = ""
    try:
        while daemon.is_alive():
            daemon.join(0.5)
            for device_id, proc in procs.items():
                if proc.poll() not in (None, 0):
                    failed = (f"device {device_id} exited with status {proc.returncode}; see "
                              f"{out / 'logs' / device_id}{log_suffix}.log")
                    break
            if failed:
                aggregator.stop()
                break
            if config.linger_s is None and aggregator.finished.is_set() and all(p.poll() == 0 for p in procs.values()):
                if personalizing:  # every device has personalized and reported: let the daemon record it
                    deadline = time.monotonic() + 30
                    while len(aggregator.store.personalizations()) < len(files) and time.monotonic() < deadline:
                        time.sleep(0.2)
                    missing = sorted(set(files) - {e["device_id"] for e in aggregator.store.personalizations()})
                    if missing:
                        failed = f"no personalization report from {', '.join(missing)}; see {out / 'logs'}"
                    aggregator.stop()
                    daemon.join(30)
                    break
                personalizing, log_suffix = True, "-personalize"  # the fleet finished: personalize each device
                print("\npersonalizing every device (edgetune device personalize) ...")
                procs = {device_id: subprocess.Popen(
                    device_command("personalize", device_id, path, f"{device_id}-personalize.log")
                    + ["--steps", "20", "--lr", "1e-3", "--l2-to-global", "1", "--seq-len", "128",
                       "--out", str(out / "personal" / device_id)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
                    for device_id, path in files.items()}
        for proc in procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.terminate()
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        with bars_lock:
            for bar in bars.values():
                bar.close()
        watcher.close()
        if broker:
            broker.stop()
    if failed:
        print(f"edgetune demo: {failed}", file=sys.stderr)
        return 1
    if not aggregator.finished.is_set():
        print(f"edgetune demo: the aggregator stopped before the fleet finished; see {out / 'logs' / 'demo.log'}",
              file=sys.stderr)
        return 1
    if personalizing:
        print(format_personalization(aggregator.store.personalizations(), out / "personal"))
    adapter_dir = out / "state" / "adapter"
    print(f"\nglobal adapter (PEFT format): {adapter_dir}")
    try:
        from .report import write_report

        print(f"report: {write_report(out / 'state', out / 'report')}")
    except ImportError as exc:  # (matplotlib is an extra)
        print(f"no report ({exc}): pip install 'edgetune[bench]'", file=sys.stderr)
    print(f"round log: {out / 'state' / 'rounds.json'}; total {time.monotonic() - t0:.0f} s")
    print(f"load it: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('{model_dir}'), '{adapter_dir}')")
    return 0


def device_classes(devices: list[str], names: str | None = None) -> dict[str, Path]:
    """Each device's class profile (``profiles/NAME.yaml``), in turn from ``names`` (comma
    separated) or ``CLASSES``; none where the checkout's profiles/ is not there."""
    from .sim.fleet import PROFILES

    chosen = [n.strip() for n in names.split(",") if n.strip()] if names else list(CLASSES)
    missing = [n for n in chosen if not (PROFILES / f"{n}.yaml").is_file()]
    if missing:
        known = ", ".join(sorted(p.stem for p in PROFILES.glob("*.yaml"))) or "none (no profiles/ folder)"
        raise ValueError(f"no device class {', '.join(missing)} in {PROFILES}; known: {known}")
    return {device: PROFILES / f"{chosen[i % len(chosen)]}.yaml" for i, device in enumerate(devices)}


def fair_shares(classes: dict[str, Path], folder: Path, threads: int, share: float = 0.8) -> dict[str, Path]:
    """The demo's devices share this machine: a class faster than its share of it (this
    machine's throughput on the device's threads, times the cores per device, times ``share``
    for headroom) gets a copy of its profile capped at that share. Otherwise the devices that
    are not slowed down would compete for the cores and miss the deadlines they were planned for."""
    import dataclasses as dc

    from .profiling import load_profile, save_profile
    from .profiling.measure import _torch_available, _torch_step, cpu_count, time_square_matmul

    if not _torch_available():
        return classes
    import torch

    torch.set_num_threads(threads)
    here = time_square_matmul(_torch_step("float32"), 0.5).gflops
    fair = here * min(1.0, cpu_count() / (threads * len(classes))) * share
    out = {}
    for device, path in classes.items():
        profile = load_profile(path)
        if profile.gflops.get("float32", 0) <= fair:
            out[device] = path
            continue
        capped = dc.replace(profile, gflops={"float32": round(fair, 1)},
                            source=f"{profile.name} capped at its share of the demo's machine; {profile.source}")
        out[device] = folder / device / f"{profile.name}.yaml"
        save_profile(capped, out[device])
        print(f"  {device}: {profile.name} capped at {fair:.0f} GFLOP/s, its share of this machine's {here:.0f} "
              f"(the devices share {cpu_count()} cores)")
    return out


def _wait_for_hello(aggregator, device_id: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while device_id not in aggregator.devices:
        if proc.poll() is not None:
            raise RuntimeError(f"device {device_id} exited with status {proc.returncode} before joining; see its log")
        if time.monotonic() > deadline:
            raise RuntimeError(f"device {device_id} did not join within {timeout:.0f} s; see its log")
        time.sleep(0.2)


def format_plans(record, aggregator, classes: dict[str, Path]) -> str:
    """The planner's choice per device, for people: class and budget, then rank, base
    precision, batch, steps, layout size and the cost model's predictions; or why not."""
    from .adapters.lora import targets

    spec = aggregator.state.adapter if aggregator.state else None
    modules = aggregator.state.model.modules if aggregator.state else {}
    title = "calibration" if record.kind == "calibrate" else f"round {record.round}"
    lines = [f"\nplan for {title} (deadline {aggregator.config.round_timeout_s:.0f} s)",
             f"  {'device':<10}{'class':<28}{'memory':>8}{'GFLOP/s':>9}{'rank':>6}{'base':>10}{'batch':>7}"
             f"{'steps':>7}{'adapted':>9}{'params':>10}{'peak':>9}{'s/step':>8}"]
    for device in sorted(set(record.plans) | set(record.excluded) | set(aggregator.devices)):
        hello = aggregator.devices.get(device)
        profile = hello.profile if hello else None
        name = profile.name if profile else (classes[device].stem if device in classes else "(no profile)")
        budget = (f"{profile.memory_bytes / 2**30:.1f}G" if profile else "")
        speed = f"{profile.gflops.get('float32', 0):.0f}" if profile else ""
        head = f"  {device:<10}{name[:27]:<28}{budget:>8}{speed:>9}"
        plan = record.plans.get(device)
        if plan is None:
            why = record.excluded.get(device, "no profile: the fleet's settings")
            lines.append(f"{head}  {'left out: ' if device in record.excluded else ''}{why}")
            continue
        layout = ""
        if spec is not None and adapter_kind(spec).has_layout:  # (matrices adapted, parameters at its rank)
            shapes = adapter_kind(spec).shapes(spec, aggregator.state.model, plan["rank"])
            layout = f"{len(targets(spec, modules)):>9}{sum(math.prod(s) for s in shapes.values()):>10,}"
        peak = f"{plan['predicted_peak_bytes'] / 2**20:,.0f}M" if plan.get("predicted_peak_bytes") else ""
        step = f"{plan['predicted_step_s']:.1f}" if plan.get("predicted_step_s") else ""
        lines.append(f"{head}{plan['rank']:>6}{plan['quantization']:>10}{plan['batch_size']:>7}{plan['local_steps']:>7}"
                     f"{layout}{peak:>9}{step:>8}" + ("  checkpointing" if plan.get("gradient_checkpointing") else ""))
    return "\n".join(lines)


def write_robustness_sets(files: dict[str, Path], folder: Path) -> dict[str, Path]:
    """Each device's robustness set: the other devices' held-out records, split exactly as
    their own ``device run`` splits them (same fraction and seed)."""
    from .data import load_texts, split_heldout
    from .device import hash_seed

    heldout = {d: split_heldout(load_texts(p), 0.1, seed=hash_seed(d))[1] for d, p in files.items()}
    folder.mkdir(parents=True, exist_ok=True)
    sets = {}
    for device_id in files:
        records = [r for other, rs in heldout.items() if other != device_id for r in rs]
        sets[device_id] = folder / f"{device_id}.jsonl"
        sets[device_id].write_text("".join(json.dumps({"text": r}) + "\n" for r in records))
    return sets


def format_personalization(entries: list[dict], folder: Path) -> str:
    lines = ["\npersonalization (own held-out ppl: global -> personal; others' held-out ppl: global -> personal)"]
    for e in sorted(entries, key=lambda e: e["device_id"]):
        robust = (f"{e['global_robust_ppl']:.2f} -> {e['personal_robust_ppl']:.2f}"
                  if e.get("global_robust_ppl") is not None else "n/a")
        lines.append(f"  {e['device_id']:<12} α={e['alpha']:<5g} own {e['global_ppl']:.2f} -> {e['personal_ppl']:.2f}"
                     f"   others' {robust}")
    lines.append(f"  personal adapters (PEFT format): {folder}/<device>")
    return "\n".join(lines)


def format_round(record) -> str:
    """A small table for people: one row per device, then the fleet's figures."""
    title = f"round {record.round} ({record.kind}) {record.status.value}"
    if record.new_version is not None:
        title += f" -> global adapter v{record.new_version}"
    lines = [f"\n{title}, {record.duration_s:.0f} s"]
    if record.kind == "train":
        lines.append(f"  {'device':<12}{'samples':>8}{'plan':>14}{'train loss':>12}{'ppl global->local':>20}"
                     f"{'others global->local':>23}{'sent':>11}{'received':>11}")
        for d in sorted(record.devices, key=lambda d: d.device_id):
            plan = record.plans.get(d.device_id)
            shown = f"r{plan['rank']} b{plan['batch_size']}×{plan['local_steps']}" if plan else "uniform"
            ppl = (f"{d.global_ppl:.2f} -> {d.local_ppl:.2f}"
                   if d.global_ppl is not None and d.local_ppl is not None else "")
            robust = (f"{d.global_robust_ppl:.2f} -> {d.local_robust_ppl:.2f}"
                      if d.global_robust_ppl is not None and d.local_robust_ppl is not None else "")
            loss = f"{d.train_loss:.3f}" if d.train_loss is not None else ""
            lines.append(f"  {d.device_id:<12}{d.num_samples:>8}{shown:>14}{loss:>12}{ppl:>20}{robust:>23}"
                         f"{_size(d.bytes_sent):>11}{_size(d.bytes_received):>11}")
        answered = {d.device_id for d in record.devices}
        for device, why in sorted(record.declined.items()):
            lines.append(f"  {device:<12} gave the round up: {why}")
        for device in sorted(set(record.asked) - answered - set(record.declined)):
            lines.append(f"  {device:<12} missed the deadline")
        for device, why in sorted(record.excluded.items()):
            lines.append(f"  {device:<12} left out: {why}")
        if record.global_ppl is not None:
            lines.append(f"  held-out ppl of global v{record.base_version} (sample-weighted): {record.global_ppl:.2f}"
                         + (f", on the others' data {record.global_robust_ppl:.2f}"
                            if record.global_robust_ppl is not None else ""))
    elif record.kind != "evaluate":  # calibrate, initialize: no perplexities yet
        lines.append(f"  from {', '.join(sorted(d.device_id for d in record.devices)) or 'no device'}"
                     + (f": {record.note}" if record.note else ""))
    else:
        for d in sorted(record.devices, key=lambda d: d.device_id):
            robust = f", others' {d.global_robust_ppl:.2f}" if d.global_robust_ppl is not None else ""
            lines.append(f"  {d.device_id:<12} held-out ppl of global v{record.base_version}: {d.global_ppl:.2f}{robust}")
        if record.global_ppl is not None:
            lines.append(f"  fleet (sample-weighted): {record.global_ppl:.2f}"
                         + (f", on the others' data {record.global_robust_ppl:.2f}"
                            if record.global_robust_ppl is not None else ""))
    if record.dropped:
        lines.append(f"  dropped: {record.dropped}")
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)
