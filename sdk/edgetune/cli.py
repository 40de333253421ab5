"""``edgetune``: the device-side command line.

    edgetune device run [--config DEVICE.toml] --broker mqtt://HOST:PORT --fleet NAME --device-id ID --data FILE [--model REF]
                        [--trainer torch|ort|auto] [--artifacts DIR] [--model-hash SHA256] [--robustness FILE]
                        [--profile FILE | --emulate CLASS.yaml | --no-plan] [--state-dir DIR] [--reprofile]
    edgetune device personalize (as run) [--lr LR] [--steps N | --epochs E] [--optimizer adamw|sgd]
                        [--l2-to-global λ] [--alpha α] [--out DIR]
    edgetune build-ort [--model REF] --rank R [--alpha A] --targets q_proj,v_proj [--prompt-tokens N] --out DIR
    edgetune demo [--devices 3] [--rounds 2] [--out demo-out] [--data DIR]
    edgetune simulate --fleet FLEET.yaml [--out DIR] [--broker URL] [--rounds N] [--model REF]
    edgetune report STATE_DIR [--out DIR]
    edgetune export --merged|--onnx --state-dir DIR [--version N] [--model REF] --out FOLDER [--force]
    edgetune bench personalization [--model REF] [--categories a,b,c] [--out DIR] [--docs docs/benchmarks.md]
    edgetune generate --onnx FOLDER --prompt TEXT [--max-new-tokens N] [--temperature T]

Anything a user can get wrong (URL, broker, model file, data file) ends in one line saying
what to do, with exit status 2, not a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import __version__

log = logging.getLogger("edgetune")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--log-file", type=Path, help="log here instead of stderr")


def _add_device_args(run: argparse.ArgumentParser) -> None:
    """What 'device run' and 'device personalize' share: the fleet, the data, the model. No
    flag has a default of its own: it is ``DeviceRunSettings``'s (or the --config file's)."""
    from .config_file import default_of
    from .run_config import LOG_LEVELS, TRAINERS, DeviceRunSettings

    def d(path: str):
        return default_of(DeviceRunSettings, path)

    run.add_argument("--config", type=Path, help="a TOML file of these settings (docs/configuration.md); flags "
                     "given as well override it")
    run.add_argument("--broker", help="mqtt://HOST:PORT, mqtts://HOST:PORT or memory://NAME (required, here or in the file)")
    run.add_argument("--fleet", help="the fleet's name (required, here or in the file)")
    run.add_argument("--device-id", help="this device's id in the fleet (required, here or in the file)")
    run.add_argument("--data", type=Path, help=".txt (one record a line) or .jsonl ({'text': ...}) (required, here "
                     "or in the file)")
    run.add_argument("--model", help="GGUF file, model folder, or tiny-llama/tiny-gpt2 (default: SmolLM2-135M-Instruct GGUF)")
    run.add_argument("--threads", type=int, help="training threads (default: all cores)")
    run.add_argument("--trainer", choices=TRAINERS, help="PyTorch, or ONNX Runtime artifacts (no PyTorch needed); "
                     f"auto: torch when installed (default {d('trainer')})")
    run.add_argument("--artifacts", type=Path, help="ONNX Runtime training artifacts from 'edgetune build-ort' "
                     "(the ort trainer's model: --model is then not loaded)")
    run.add_argument("--fetch-timeout", type=float, help="when --artifacts holds none, wait this long "
                     "for the aggregator to offer them (its --ort-artifacts) and for each download to progress "
                     f"(default {d('fetch_timeout_s'):g} s)")
    run.add_argument("--model-hash", help="refuse artifacts whose base weights do not have this SHA-256 "
                     "(a prefix is enough; 'model_hash' in the artifacts' edgetune-ort.json)")
    run.add_argument("--heldout", type=float, help="fraction of records held out for evaluation "
                     f"(default {d('heldout_fraction'):g})")
    run.add_argument("--connect-timeout", type=float, help="give up on the broker after S seconds (default: retry forever)")
    planning = run.add_argument_group("planning (docs/planner.md): by default the device measures itself on its first "
                                      "start and the aggregator plans its rank, base precision, batch and steps")
    planning.add_argument("--profile", type=Path, help="announce this profile (from 'edgetune profile') instead of "
                          "measuring; its memory is the budget training stays within")
    planning.add_argument("--state-dir", type=Path, help="where the device keeps its measured profile (default: "
                          "~/.local/state/edgetune/FLEET/DEVICE_ID)")
    planning.add_argument("--reprofile", action="store_true", default=None, help="measure this machine again, even "
                          "if nothing about it changed")
    planning.add_argument("--emulate", type=Path, metavar="PROFILE", help="behave as this (slower) device class, "
                          "e.g. profiles/raspberry-pi-4-4gb-gateway.yaml: its memory budget and speed, no more "
                          "than this machine's")
    planning.add_argument("--uplink-mbps", type=float, help="what this site's uplink sustains, Mbit/s (planning "
                          "counts the upload time of updates)")
    planning.add_argument("--no-plan", action="store_true", default=None, help="send no profile: train the fleet's "
                          "uniform settings (the behaviour before planning was the default)")
    run.add_argument("--robustness", type=Path, help="held-out text of the other sites (.txt/.jsonl), given by the "
                     "operator: the robustness score is the perplexity on it")
    run.add_argument("--validation", type=float, help="fraction of the training records (with at least 10) that "
                     "neither rounds nor personalization train on: where α is chosen (0: none; default "
                     f"{d('validation_fraction'):g})")
    policy = run.add_argument_group("training policy (when this machine's own job allows: docs/operations.md)")
    policy.add_argument("--idle-cpu", type=float, help="train only while the rest of the machine uses at most this "
                        "share of its CPUs (0.5: half)")
    policy.add_argument("--train-window", metavar="HH:MM-HH:MM", help="train only inside this local-time window "
                        "(22:00-06:00 wraps midnight)")
    policy.add_argument("--mains-only", action="store_true", default=None, help="train only on mains power (where the "
                        "OS tells)")
    run.add_argument("--label", action="append", metavar="KEY=VALUE", help="what the operator says of this device "
                     "(site=plant-3; repeatable): a staged rollout may choose its canaries by it")
    security = run.add_argument_group("security (files from 'edgetune-aggregator provision', docs/security.md)")
    security.add_argument("--fleet-key", type=Path, help="the fleet's public key (fleet.pub from edgetune-aggregator "
                          "provision): accept tasks and adapters only signed by the aggregator (docs/security.md)")
    security.add_argument("--signing-key", type=Path, help="this device's Ed25519 key (signing.key): everything it "
                          "sends is signed")
    security.add_argument("--ca", type=Path, help="CA certificate of an mqtts:// broker (ca.crt)")
    security.add_argument("--cert", type=Path, help="this device's client certificate (client.crt)")
    security.add_argument("--key", type=Path, help="the private key of --cert (client.key)")
    run.add_argument("--log-level", choices=LOG_LEVELS, help=f"default {d('log_level')}")
    run.add_argument("--log-file", type=Path, help="log here instead of stderr")


def _labels(pairs: list[str]) -> dict[str, str]:
    """``--label site=plant-3 --label class=pi4`` as a dict (a malformed one: a one-line error)."""
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"edgetune: error: --label {pair!r}: expected KEY=VALUE")
        labels[key.strip()] = value.strip()
    return labels


#: the flags of 'device run' and 'device personalize' that set a DeviceRunSettings field
DEVICE_FLAGS = (
    ("broker", "broker", None), ("fleet", "fleet", None), ("device_id", "device_id", None), ("data", "data", None),
    ("model", "model", None), ("threads", "threads", None), ("trainer", "trainer", None),
    ("artifacts", "artifacts", None), ("fetch_timeout", "fetch_timeout_s", None), ("model_hash", "model_hash", None),
    ("heldout", "heldout_fraction", None), ("validation", "validation_fraction", None),
    ("robustness", "robustness", None), ("connect_timeout", "connect_timeout_s", None),
    ("no_plan", "plan", lambda v: not v), ("profile", "profile", None), ("state_dir", "state_dir", None),
    ("reprofile", "reprofile", None), ("emulate", "emulate", None), ("uplink_mbps", "uplink_mbps", None),
    ("signing_key", "signing_key", None), ("fleet_key", "fleet_key", None), ("ca", "tls_ca", None), ("cert", "tls_cert", None), ("key", "tls_key", None),
    ("log_level", "log_level", None), ("log_file", "log_file", None), ("stay", "stay", None),
    ("label", "labels", lambda pairs: _labels(pairs)),
    ("idle_cpu", "policy.idle_cpu", None), ("train_window", "policy.window", None), ("mains_only", "policy.mains_only", None),
    ("lr", "personalize.learning_rate", None), ("steps", "personalize.steps", None),
    ("epochs", "personalize.epochs", None), ("optimizer", "personalize.optimizer", None),
    ("l2_to_global", "personalize.l2_to_global", None), ("alpha", "personalize.alpha", None),
    ("alphas", "personalize.alphas", lambda text: tuple(float(a) for a in text.split(",") if a.strip())),
    ("batch_size", "personalize.batch_size", None), ("seq_len", "personalize.seq_len", None),
    ("wait", "global_wait_s", None), ("out", "personal_out", None),
)
#: what a device cannot start without: (field, flag)
DEVICE_REQUIRED = (("broker", "--broker"), ("fleet", "--fleet"), ("device_id", "--device-id"), ("data", "--data"))


def device_settings(args: argparse.Namespace):
    """``DeviceRunSettings`` from (last wins) its defaults, the --config file, the flags given."""
    from .config_file import SettingsFile, flags_given
    from .run_config import DeviceRunSettings

    source = SettingsFile(args.config)
    source.override(flags_given(args, DEVICE_FLAGS))
    source.require(DEVICE_REQUIRED)
    return source.build(DeviceRunSettings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"edgetune {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    device = commands.add_parser("device", help="run this machine as a device of a fleet")
    device_commands = device.add_subparsers(dest="device_command", required=True)
    run = device_commands.add_parser("run", help="join a fleet and train when told")
    _add_device_args(run)
    run.add_argument("--stay", action="store_true", default=None, help="keep running after the fleet finishes")
    personal = device_commands.add_parser("personalize", help="fine-tune the fleet's global adapter on this "
                                          "device's data; keep and report the personal adapter (docs/personalization.md)")
    _add_device_args(personal)
    from .config_file import default_of
    from .run_config import DeviceRunSettings
    from .wire import CLIENT_OPTIMIZERS

    def p(name: str):
        return default_of(DeviceRunSettings, f"personalize.{name}")

    personal.add_argument("--lr", type=float, help=f"learning rate (default {p('learning_rate'):g}: small, as Profit advises)")
    personal.add_argument("--steps", type=int, help=f"optimizer steps (default {p('steps')})")
    personal.add_argument("--epochs", type=int, help="passes over the device's data instead of --steps")
    personal.add_argument("--optimizer", choices=CLIENT_OPTIMIZERS, help=f"default {p('optimizer')}")
    personal.add_argument("--l2-to-global", type=float, help=f"λ of λ/2·‖θ − θ_global‖² (default {p('l2_to_global'):g})")
    personal.add_argument("--alpha", type=float, help="serve (1−α)·global + α·local (default: α chosen on a "
                          "validation split from --alphas)")
    personal.add_argument("--alphas", help="comma-separated α values to choose from (default "
                          f"{','.join(f'{a:g}' for a in p('alphas'))})")
    personal.add_argument("--batch-size", type=int, help=f"default {p('batch_size')}")
    personal.add_argument("--seq-len", type=int, help=f"default {p('seq_len')}")
    personal.add_argument("--wait", type=float, help="seconds to wait for the fleet's global adapter "
                          f"(default {default_of(DeviceRunSettings, 'global_wait_s'):g})")
    personal.add_argument("--out", type=Path, help="write the personal adapter here in PEFT format")

    from .profiling.cli import add_profile_parser

    _add_common(add_profile_parser(commands))

    plan = commands.add_parser("plan", help="show the configuration the planner picks for each device profile")
    plan.add_argument("--profiles", type=Path, nargs="+", required=True, help="profile YAML files")
    plan.add_argument("--model", help="as for 'device run' (default: SmolLM2-135M-Instruct GGUF)")
    plan.add_argument("--deadline", type=float, default=600.0, help="round deadline in seconds")
    plan.add_argument("--seq-len", type=int, default=128)
    plan.add_argument("--max-rank", type=int, default=16)
    plan.add_argument("--targets", default="q_proj,v_proj")
    plan.add_argument("--max-steps", type=int, default=50, help="most optimizer steps a device takes per round")
    plan.add_argument("--uplink-budget-mb", type=float, help="fleet-wide MB of updates per round (solved as a MILP)")
    _add_common(plan)

    manifest = commands.add_parser("manifest", help="write the model's manifest (layers, fingerprint) for the "
                                   "aggregator's --model-manifest, which pins the fleet to that model")
    manifest.add_argument("--model", help="as for 'device run' (default: SmolLM2-135M-Instruct GGUF)")
    manifest.add_argument("--out", type=Path, help="write it here (default: print it)")
    _add_common(manifest)

    from .bench.personalization import add_parser as add_bench_parser

    _add_common(add_bench_parser(commands))

    simulate = commands.add_parser("simulate", help="a fleet of device classes on this machine in simulated time: "
                                   "real training, real daemon, each device as slow as its class (docs/simulation.md)")
    simulate.add_argument("--fleet", type=Path, required=True, help="the fleet's YAML (e.g. profiles/fleets/fedpipe-8.yaml)")
    simulate.add_argument("--out", type=Path, default=Path("sim-out"), help="state dir, report and logs go here")
    simulate.add_argument("--broker", help="an MQTT broker (mqtt://HOST:PORT) instead of the in-memory one")
    simulate.add_argument("--rounds", type=int, help="override the fleet file's rounds")
    simulate.add_argument("--seed", type=int, help="override the fleet file's seed")
    simulate.add_argument("--model", help="override the fleet file's model (e.g. tiny-llama)")
    simulate.add_argument("--threads", type=int, help="training threads (default: all cores)")
    simulate.add_argument("--no-plan", action="store_true", help="devices send no profile: the fleet's uniform settings")
    simulate.add_argument("--no-report", action="store_true", help="do not write the HTML report")
    _add_common(simulate)

    report = commands.add_parser("report", help="an offline HTML page with plots of a run, from the aggregator's state dir")
    report.add_argument("state_dir", type=Path, help="the aggregator's --state-dir (the demo's: demo-out/state)")
    report.add_argument("--out", type=Path, help="folder for index.html and the PNGs (default: STATE_DIR/../report)")
    _add_common(report)

    demo = commands.add_parser("demo", help="a whole federation on this machine: broker, aggregator, devices")
    demo.add_argument("--devices", type=int, default=3)
    demo.add_argument("--rounds", type=int, default=2)
    demo.add_argument("--steps", type=int, default=8, help="optimizer steps per device per round")
    demo.add_argument("--out", type=Path, default=Path("demo-out"))
    demo.add_argument("--data", type=Path, help="folder with one .txt/.jsonl per device (default: generated)")
    demo.add_argument("--model", help="as for 'device run' (default: SmolLM2-135M-Instruct GGUF)")
    demo.add_argument("--broker", help="use this broker instead of starting the embedded one")
    demo.add_argument("--ort-devices", type=int, default=0,
                      help="how many of the devices train with ONNX Runtime instead of PyTorch (docs/ort.md)")
    demo.add_argument("--adapter", choices=["lora", "prompt"], default="lora",
                      help="train LoRA (r=8 on q,v) or a soft prompt of 20 virtual tokens")
    demo.add_argument("--personalize", action="store_true", help="after the last round, personalize every device "
                      "and show its own and the others' perplexity (docs/personalization.md)")
    demo.add_argument("--classes", help="device classes from profiles/ the devices emulate in turn, comma separated "
                      "(default: raspberry-pi-4-4gb-gateway, jetson-orin-nano-8gb, intel-n100-16gb, ...)")
    demo.add_argument("--deadline", type=float, default=90.0, help="round deadline in seconds: the planner fits each "
                      "device's steps to it (default 90)")
    demo.add_argument("--eval-blocks", type=int, default=2, help="held-out blocks each device scores per round "
                      "(scoring is part of a slow device's round time)")
    demo.add_argument("--no-plan", action="store_true", help="devices send no profile: one uniform configuration, "
                      "as before planning was the default")
    _add_common(demo)

    build = commands.add_parser("build-ort", help="ONNX Runtime training artifacts for devices without PyTorch "
                                "(run where PyTorch is installed)")
    build.add_argument("--model", help="as for 'device run' (default: SmolLM2-135M-Instruct GGUF)")
    build.add_argument("--rank", type=int, default=8, help="the fleet's LoRA rank (devices may train any rank up to it)")
    build.add_argument("--alpha", type=float, default=16.0, help="the fleet's LoRA alpha, as the aggregator's --alpha "
                       "(default 16, the aggregator's default)")
    build.add_argument("--targets", help="comma-separated modules, as the aggregator's --targets "
                       "(default: q_proj,v_proj; c_attn on GPT-2)")
    build.add_argument("--prompt-tokens", type=int, help="build a soft prompt of N virtual tokens instead of LoRA, "
                       "as the aggregator's --adapter prompt --prompt-tokens N")
    build.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay baked into "
                       "optimizer_model.onnx, for those who drive ORT's own Optimizer; edgetune's trainer takes it "
                       "from each round's settings")
    build.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping baked into "
                       "optimizer_model.onnx (as --weight-decay)")
    build.add_argument("--out", type=Path, required=True, help="folder to write (must be absent or empty)")
    build.add_argument("--force", action="store_true", help="replace a non-empty --out")
    _add_common(build)

    export = commands.add_parser("export", help="write the fleet's global adapter merged into the base model")
    form = export.add_mutually_exclusive_group(required=True)
    form.add_argument("--merged", action="store_true",
                      help="fold the adapter into the base weights: a plain Hugging Face model folder")
    form.add_argument("--onnx", action="store_true",
                      help="the merged model as ONNX (optimum), for 'edgetune generate' with onnxruntime alone")
    export.add_argument("--state-dir", type=Path, required=True, help="the aggregator's --state-dir")
    export.add_argument("--version", type=int, help="global adapter version (default: the current one)")
    export.add_argument("--model", help="the fleet's base, as for 'device run' (default: SmolLM2-135M-Instruct GGUF)")
    export.add_argument("--out", type=Path, required=True, help="folder to write (must be absent or empty)")
    export.add_argument("--force", action="store_true", help="replace a non-empty --out")
    _add_common(export)

    generate = commands.add_parser("generate", help="generate text with an 'export --onnx' folder (onnxruntime only)")
    generate.add_argument("--onnx", type=Path, required=True, help="folder made by 'edgetune export --onnx'")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    generate.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (0: all)")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--threads", type=int)
    _add_common(generate)
    return parser


def setup_logging(level: str, log_file: Path | None = None) -> None:
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for noisy in ("transformers", "amqtt", "transitions", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


def _device(settings, command: str):
    """The ``Device`` that 'device run' and 'device personalize' use, connected."""
    from .device import Device, DeviceConfig, announced_profile, client_id, hash_seed
    from .profiling.auto import default_state_dir
    from .transport import open_transport
    from .workload import Workload, choose_backend

    s = settings
    if s.fleet_key is not None:  # (a wrong path is said now, not after loading the model and profiling)
        from .wire.signing import FleetKey

        FleetKey.load(s.fleet_key)
    if choose_backend(s.trainer, s.artifacts) == "ort":  # fetched from the aggregator if absent
        from .ort.fetch import ensure_artifacts

        ensure_artifacts(s.broker, s.fleet, s.device_id, s.artifacts, s.fetch_timeout_s, s.connect_timeout_s,
                         fleet_key=s.fleet_key, **s.tls)
    # (its own client id: personalizing must not disconnect a 'device run' of the same device)
    suffix = "-personalize" if command == "personalize" else ""
    # a persistent session for 'device run': the broker keeps its tasks while it is away
    transport = open_transport(s.broker, client_id=client_id(s.fleet, s.device_id, s.signing_key, suffix),
                               connect_timeout=s.connect_timeout_s, clean_session=bool(suffix), **s.tls)
    workload = Workload.load(s.data, s.model, s.heldout_fraction, seed=hash_seed(s.device_id), threads=s.threads,
                             trainer=s.trainer, artifacts=s.artifacts, model_hash=s.model_hash,
                             robustness=s.robustness, validation_fraction=s.validation_fraction)
    if suffix:  # (a second process of a device: its 'device run' announced the profile)
        profile, clock = load_profile_arg(s.profile), None
    else:  # measured now, once the cheap mistakes (URL, files, model) have been ruled out
        profile, clock = announced_profile(s.fleet, s.device_id, plan=s.plan, profile=s.profile,
                                           state_dir=s.state_dir, reprofile=s.reprofile, emulate=s.emulate,
                                           threads=s.threads, uplink_mbps=s.uplink_mbps)
    from .policy import policy_from_settings

    config = DeviceConfig(s.fleet, s.device_id, heldout_fraction=s.heldout_fraction,
                          exit_when_finished=not s.stay, profile=profile, signing_key=s.signing_key,
                          fleet_key=s.fleet_key, state_dir=s.state_dir or default_state_dir(s.fleet, s.device_id),
                          labels=dict(s.labels), policy=policy_from_settings(s.policy), policy_check_s=s.policy.check_s)
    device = Device(config, transport, workload, clock)
    # personalizing is a second process of a device of the fleet: it must not replace the
    # hello (profile and all) and presence its 'device run' announced
    device.connect(announce=command != "personalize")
    return device


def _manifest(args: argparse.Namespace) -> int:
    """The manifest the device sends in its hello for this model, as the aggregator reads it."""
    import json

    from .models import load_model
    from .wire.manifest_file import manifest_to_dict, write_manifest

    manifest = load_model(args.model).manifest
    if args.out:
        write_manifest(args.out, manifest)
        print(f"{args.out}: {manifest.name}, fingerprint {manifest.fingerprint}, {len(manifest.modules)} layers")
    else:
        print(json.dumps(manifest_to_dict(manifest), indent=2, sort_keys=True))
    return 0


def load_profile_arg(path: Path | None):
    if path is None:
        return None
    from .profiling import load_profile

    return load_profile(path)


def _device_run(settings, command: str) -> int:
    if command == "personalize":
        return _device_personalize(settings)
    device = _device(settings, command)
    try:
        device.run()
    except KeyboardInterrupt:
        log.info("interrupted")
    return 0


def _device_personalize(settings) -> int:
    device = _device(settings, "personalize")
    out = settings.personal_out
    try:
        adapter = device.wait_for_global(settings.global_wait_s)
        report = device.personalize(settings.personalize)
        if out:
            device.save_adapter(out)
    finally:
        device.close()
    robust = (f"; others' data {report.global_robust_ppl:.2f} -> {report.personal_robust_ppl:.2f}"
              if report.global_robust_ppl is not None else "")
    print(f"personalized global v{adapter.version} with α={report.alpha:g}: own held-out ppl "
          f"{report.global_ppl:.2f} -> {report.personal_ppl:.2f} (local only {report.local_ppl:.2f}){robust}"
          + (f"; personal adapter in {out}" if out else ""))
    return 0


def _build_ort(args: argparse.Namespace) -> int:
    from .ort.artifacts import OptimizerSettings
    from .ort.build import build_artifacts

    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip()) if args.targets else None
    manifest = build_artifacts(args.model, args.out, rank=args.rank, alpha=args.alpha, targets=targets,
                               optimizer=OptimizerSettings(args.weight_decay, args.max_grad_norm), force=args.force,
                               prompt_tokens=args.prompt_tokens)
    print(f"{args.out}: {manifest.model.name}, {manifest.adapter.describe()}, model hash {manifest.model_hash[:16]}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export_merged, export_onnx

    export = export_onnx if args.onnx else export_merged
    export(args.state_dir, args.out, version=args.version, model_ref=args.model, force=args.force)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from .ort.generate import OnnxGenerator

    generator = OnnxGenerator(args.onnx, threads=args.threads)
    result = generator.generate(args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed)
    print(result.text)
    log.info("%d new tokens after a %d-token prompt in %.2f s", len(result.ids), result.prompt_tokens, result.seconds)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "device":  # (its log settings may come from its --config file)
        from .config_file import default_of
        from .run_config import DeviceRunSettings

        setup_logging(args.log_level or default_of(DeviceRunSettings, "log_level"), args.log_file)
    else:
        setup_logging(args.log_level, args.log_file)
    from .data import DataError
    from .export import ExportError
    from .models import ModelError
    from .report import ReportError
    from .sim.fleet import FleetError
    from .transport import TransportError

    try:
        if args.command == "device":
            settings = device_settings(args)
            if (settings.log_level, settings.log_file) != (args.log_level, args.log_file):
                setup_logging(settings.log_level, settings.log_file)
            return _device_run(settings, args.device_command)
        if args.command == "profile":
            from .profiling.cli import run_profile

            return run_profile(args)
        if args.command == "plan":
            from .planning.report import run_plan

            return run_plan(args)
        if args.command == "manifest":
            return _manifest(args)
        if args.command == "export":
            return _export(args)
        if args.command == "build-ort":
            return _build_ort(args)
        if args.command == "generate":
            return _generate(args)
        if args.command == "simulate":
            from .sim.cli import run_simulate

            return run_simulate(args)
        if args.command == "report":
            from .report import write_report

            out = args.out or args.state_dir.resolve().parent / "report"
            print(f"report: {write_report(args.state_dir, out)}")
            return 0
        if args.command == "bench":
            from .bench.personalization import main as bench_personalization

            return bench_personalization(args)
        from .demo import run_demo

        return run_demo(args)
    except (TransportError, ModelError, DataError, ExportError, ReportError, FleetError, ValueError, FileExistsError,
            FileNotFoundError, ImportError) as exc:
        print(f"edgetune: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
