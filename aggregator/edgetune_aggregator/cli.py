"""``edgetune-aggregator serve``: run a fleet's rounds against an MQTT broker.

    edgetune-aggregator serve [--config FLEET.toml] --broker mqtt://HOST:PORT --fleet NAME --state-dir DIR \\
        [--min-devices N] [--round-timeout S] [--rounds R] \
        [--strategy auto|fedit|hetlora|stack|svd] [--server-optimizer fedavg|fedavgm|fedadam|fedyogi] \
        [--layout fixed|importance] [--proximal-mu MU] [--adapter lora|prompt --prompt-tokens N] \
        [--algorithm fedavg|fedsgd] [--client-optimizer adamw|sgd] [--local-epochs E]

    edgetune-aggregator provision --fleet NAME --devices N --out DIR   (CA, certificates, ACL, keys)
    edgetune-aggregator versions|promote VERSION|rollback VERSION --state-dir DIR   (operate.py)

Restarting with the same ``--state-dir`` resumes the round that was open (docs/reliability.md).
Every setting can come from a TOML file instead (``--config``, docs/configuration.md); flags
given as well override it, and the defaults are the dataclasses' (``AggregatorConfig``,
``ServeSettings``), never argparse's.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import signal
import sys
from pathlib import Path

from edgetune import __version__
from edgetune.config_file import FlagMap, SettingsFile, default_of, flags_given
from edgetune.transport import TransportError, open_transport
from edgetune.wire import ADAPTER_KINDS, ALGORITHMS, CLIENT_OPTIMIZERS, PROMPT_INITS, PromptSpec

from .config import DELTA_PRECISION_MODES, LAYOUTS, PLAN_MODES
from .daemon import DEFAULT_CANDIDATES, Aggregator, AggregatorConfig
from .serve_settings import LOG_LEVELS, ServeSettings
from .strategies import SERVER_OPTIMIZERS, STRATEGIES
from .strategies.optimizers import DEFAULT_MOMENTUM
from .strategies.robust import ROBUST_METHODS
from .validation import NORM_ACTIONS

log = logging.getLogger("edgetune_aggregator")


def _d(path: str):
    """AggregatorConfig's default for a help text (defined there, once)."""
    return default_of(AggregatorConfig, path)


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def build_parser() -> argparse.ArgumentParser:
    """Every ``serve`` flag defaults to None: the default is the dataclass's (or the file's)."""
    parser = argparse.ArgumentParser(prog="edgetune-aggregator", description="edgetune aggregator daemon")
    parser.add_argument("--version", action="version", version=f"edgetune-aggregator {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run federated rounds for one fleet")
    serve.add_argument("--config", type=Path, help="a TOML file of these settings (docs/configuration.md); "
                       "flags given as well override it")
    serve.add_argument("--broker", help="mqtt://HOST:PORT or mqtts://HOST:PORT (required, here or in the file)")
    serve.add_argument("--cluster-node", action="append", metavar="URL",
                       help="another node of a clustered broker that keeps retained messages per node "
                       "(ejabberd); repeat for each (docs/deploy.md)")
    serve.add_argument("--fleet", help="the fleet's name (required, here or in the file)")
    serve.add_argument("--state-dir", type=Path, help="where rounds and adapters are kept (required, here or in the file)")
    serve.add_argument("--min-devices", type=int, help=f"updates needed to close a round (default {_d('min_devices')})")
    serve.add_argument("--round-timeout", type=float, help="seconds before a round closes anyway "
                       f"(default {_d('round_timeout_s'):g})")
    serve.add_argument("--join-timeout", type=float, help="seconds to wait for the first devices (default: forever)")
    serve.add_argument("--rounds", type=int, help="train rounds, then evaluate and exit (default: run forever)")
    serve.add_argument("--connect-timeout", type=float, help="give up on the broker after S seconds (default: retry forever)")
    group = serve.add_argument_group("adapter and local training (sent to devices in each task)")
    group.add_argument("--adapter", choices=ADAPTER_KINDS, help="lora: low-rank factors on --targets; prompt: a "
                       f"soft prompt of --prompt-tokens (default {_d('adapter.kind')})")
    group.add_argument("--rank", type=int, help=f"LoRA rank (default {_d('adapter.rank')})")
    group.add_argument("--alpha", type=float, help=f"LoRA alpha (default {_d('adapter.alpha'):g})")
    group.add_argument("--targets", help="comma-separated module names (default "
                       f"{','.join(_d('adapter.target_modules'))})")
    group.add_argument("--prompt-tokens", type=int, help="virtual tokens of a soft prompt "
                       f"(default {default_of(PromptSpec, 'num_virtual_tokens')})")
    group.add_argument("--prompt-init", choices=PROMPT_INITS,
                       help="start a soft prompt from random vocabulary tokens' embeddings, Gaussian vectors of the "
                       f"embeddings' scale, or --prompt-init-text's embeddings (default {default_of(PromptSpec, 'init')})")
    group.add_argument("--prompt-init-text", help="text whose token embeddings start the prompt")
    group.add_argument("--algorithm", choices=ALGORITHMS,
                       help="fedavg: devices train --steps (or --local-epochs) and send the change; fedsgd: devices "
                       f"send one gradient and the server steps with --server-lr (default {_d('train.algorithm')})")
    group.add_argument("--client-optimizer", choices=CLIENT_OPTIMIZERS, help=f"default {_d('train.optimizer')}")
    group.add_argument("--local-epochs", type=int, help="passes over each device's data per round "
                       "(instead of --steps; 0: use --steps)")
    group.add_argument("--steps", type=int, help=f"optimizer steps per device per round (default {_d('train.local_steps')})")
    group.add_argument("--batch-size", type=int, help=f"default {_d('train.batch_size')}")
    group.add_argument("--grad-accum", type=int, help=f"default {_d('train.grad_accum')}")
    group.add_argument("--seq-len", type=int, help=f"default {_d('train.seq_len')}")
    group.add_argument("--lr", type=float, help=f"devices' learning rate (default {_d('train.learning_rate'):g})")
    group.add_argument("--seed", type=int, help=f"the fleet's seed and the devices' (default {_d('seed')})")
    group.add_argument("--proximal-mu", type=float, help="FedProx: mu/2·‖θ − θ_global‖² in the local loss "
                       f"(default {_d('train.proximal_mu'):g}: off)")
    group.add_argument("--no-planning", action="store_true", default=None,
                       help="ignore device profiles: every device trains with these settings")
    group.add_argument("--plan", choices=PLAN_MODES,
                       help="auto: each device its best configuration; weakest: the one configuration every device "
                       "can run; uniform: these settings for all, devices they do not fit sit out (docs/planner.md; "
                       f"default {_d('plan')})")
    group.add_argument("--eval-blocks", type=int, help="held-out blocks each device evaluates per round "
                       f"(default {_d('train.eval_blocks')})")
    merge = serve.add_argument_group("aggregation")
    merge.add_argument("--strategy", choices=["auto", *STRATEGIES],
                       help="how adapters of different ranks are merged (auto, the default: hetlora when planning, else fedit)")
    merge.add_argument("--merged-rank", type=int, help="stack/svd: components per layer of the frozen "
                       "merged delta devices download (default: --rank, so at most 2× fedit's downlink; -1: unbounded)")
    merge.add_argument("--delta-precision", choices=DELTA_PRECISION_MODES,
                       help="what deltas travel as, both ways: fp32, fp16, or int8 (a scale per 128 values, with error "
                       "feedback on devices); auto: float32 down, and each planned device's update in what its uplink "
                       f"calls for (default {_d('delta_precision')}; bounds in docs/protocol.md)")
    merge.add_argument("--server-optimizer", choices=SERVER_OPTIMIZERS,
                       help=f"how a round's merged update moves the global (default {_d('server_optimizer.name')}: "
                       "server momentum, the fleet benchmark's best; fedavg with --server-lr 1 is plain FedAvg)")
    merge.add_argument("--server-lr", type=float, help=f"server learning rate (default {_d('server_optimizer.lr'):g})")
    merge.add_argument("--server-momentum", type=float,
                       help=f"fedavgm's beta (default {DEFAULT_MOMENTUM['fedavgm']:g}), fedadam/fedyogi's beta1 "
                       f"(default {DEFAULT_MOMENTUM['fedadam']:g})")
    merge.add_argument("--server-beta2", type=float, help=f"default {_d('server_optimizer.beta2'):g}")
    merge.add_argument("--server-tau", type=float, help=f"default {_d('server_optimizer.tau'):g}")
    layout = serve.add_argument_group("adapter layout")
    layout.add_argument("--layout", choices=LAYOUTS,
                        help="importance: a calibration round scores every candidate matrix and picks those that "
                        f"get adapters (docs/importance.md; default {_d('layout')})")
    layout.add_argument("--candidates", help="matrix names an importance layout chooses among "
                        f"(default {','.join(DEFAULT_CANDIDATES)})")
    layout.add_argument("--adapter-budget", type=int,
                        help="adapter parameters the importance layout may use (default: those of --targets at --rank)")
    layout.add_argument("--calibration-batches", type=int,
                        help=f"batches each device scores (default {_d('importance.batches')})")
    layout.add_argument("--calibration-batch-size", type=int,
                        help=f"blocks per scoring batch, at most (default {_d('importance.batch_size')})")
    serve.add_argument("--linger", type=float, help="after the last round, keep recording devices' "
                       f"personalization reports for S seconds (negative: until stopped; default {_d('linger_s'):g})")
    serve.add_argument("--base-model", help="recorded in the exported PEFT adapter_config.json")
    serve.add_argument("--ort-artifacts", type=Path, help="ONNX Runtime training artifacts (edgetune build-ort) to "
                       "serve over MQTT to devices without PyTorch (docs/ort.md)")
    security = serve.add_argument_group("security and robustness (docs/security.md)")
    security.add_argument("--device-keys", type=Path, help="the fleet's device_keys.json (edgetune-aggregator "
                          "provision): devices must sign hellos and results with their Ed25519 keys")
    security.add_argument("--fleet-key", type=Path, help="the fleet key (aggregator/fleet.key from edgetune-aggregator "
                          "provision): tasks, global adapters, receipts and offers are signed with it, and devices "
                          "holding fleet.pub refuse what it did not sign")
    security.add_argument("--tls-ca", type=Path, help="CA certificate of an mqtts:// broker")
    security.add_argument("--tls-cert", type=Path, help="this daemon's client certificate (brokers that require one)")
    security.add_argument("--tls-key", type=Path, help="the private key of --tls-cert")
    security.add_argument("--admit", type=Path, help="a file of device ids, one a line: only they may join "
                          "(for fleets without --device-keys; with them, the key file is the list)")
    security.add_argument("--model-manifest", type=Path, help="the fleet's model: a file 'edgetune manifest --model M' "
                          "wrote; hellos for another model are refused (default: SmolLM2-135M-Instruct, the default model)")
    security.add_argument("--model-from-first-hello", action="store_true", default=None, help="take the fleet's "
                          "model from the first device that says hello (trusted labs only: one device then decides for all)")
    security.add_argument("--max-update-norm", type=float, help="L2 bound on each update's delta (default: none)")
    security.add_argument("--norm-action", choices=NORM_ACTIONS, help="an update over --max-update-norm is scaled "
                          f"onto the bound (clip) or refused (default {_d('limits.norm_action')})")
    security.add_argument("--min-samples", type=int,
                          help=f"fewest samples an update may claim (default {_d('limits.min_samples')})")
    security.add_argument("--max-samples", type=int, help="most samples an update may claim (its weight in the "
                          f"average; default {_d('limits.max_samples')})")
    security.add_argument("--max-sample-ratio", type=float, help="an update's claimed samples count at most this "
                          "multiple of the round's median claim (0: unbounded, the old behaviour; default "
                          f"{_d('influence.sample_ratio'):g})")
    security.add_argument("--max-norm-ratio", type=float, help="an update's delta is clipped at this multiple of "
                          f"the round's median norm (0: unbounded, the old behaviour; default {_d('influence.norm_ratio'):g})")
    security.add_argument("--max-global-change", type=float, help="refuse to publish a global that moves more than "
                          "this multiple of what the round's typical (lower median) update moves alone (0: check only "
                          f"that it is finite and of the fleet's layout; default {_d('max_global_change'):g})")
    security.add_argument("--robust", choices=ROBUST_METHODS,
                          help="coordinate-wise median or trimmed mean instead of the weighted mean (fedit, dense)")
    security.add_argument("--trim", type=float,
                          help=f"fraction trimmed at each end by --robust trimmed_mean (default {_d('trim'):g})")
    security.add_argument("--quorum", type=float, help="close a round once this fraction of the "
                          "devices it asked answered (at least --min-devices); default: at --min-devices")
    security.add_argument("--max-staleness", type=int, help="fold an update that arrives after its "
                          "round closed into the open round if its global is at most this many versions old "
                          f"(FedBuff-style; fedit/dense; default {_d('max_staleness')}: refuse late updates)")
    security.add_argument("--staleness-exponent", type=float, help="a late update's weight is multiplied by "
                          f"(1 + lag)^-exponent (default {_d('staleness_exponent'):g})")
    security.add_argument("--promote", choices=("auto", "manual"), help="auto: serve each new global version "
                          "once stored; manual: only `edgetune-aggregator promote` changes what devices serve "
                          f"(default {_d('promote')}; docs/operations.md)")
    security.add_argument("--max-regression", type=float, help="the validation gate: the most the fleet's held-out "
                          "perplexity may rise over the serving version's before a new version is refused "
                          f"(default {_d('gate.max_regression')}; negative: no overall check)")
    security.add_argument("--max-device-regression", type=float, help="the validation gate: the most any one "
                          "device's may rise (default: not checked per device)")
    security.add_argument("--canary-fraction", type=float, help="staged rollout: the share of devices that serve a "
                          "promoted version first; the rest follow once their reports pass (default: all at once)")
    security.add_argument("--max-canary-regression", type=float, help="staged rollout: the most a canary's held-out "
                          f"perplexity may rise before the canaries go back (default {_d('rollout.max_canary_regression')})")
    security.add_argument("--metrics-port", type=int, help="serve /metrics (Prometheus) and /healthz "
                          "on this port (0: any free port)")
    security.add_argument("--metrics-host", help="address for --metrics-port "
                          f"(default {default_of(ServeSettings, 'metrics_host')})")
    serve.add_argument("--log-level", choices=LOG_LEVELS, help=f"default {default_of(ServeSettings, 'log_level')}")
    scale = serve.add_argument_group("workers (docs/deploy.md)")
    scale.add_argument("--workers", type=int, metavar="K",
                       help="start K worker processes beside the daemon (restarted if they die): they take the "
                            "devices' updates in through an MQTT 5 shared subscription and merge their shares")
    scale.add_argument("--workers-elsewhere", action="store_true", default=None,
                       help="updates come from `edgetune-aggregator worker` processes run elsewhere")
    worker = commands.add_parser("worker", help="take a share of a fleet's updates in (beside `serve --workers`)")
    worker.add_argument("--broker", required=True, help="mqtt://HOST:PORT or mqtts://HOST:PORT (MQTT 5)")
    worker.add_argument("--fleet", required=True)
    worker.add_argument("--id", required=True, help="this worker's name (its reports and state carry it)")
    worker.add_argument("--state-dir", type=Path, required=True, help="this worker's journal")
    worker.add_argument("--group", default="edgetune-workers", help="the shared subscription's group")
    worker.add_argument("--device-keys", type=Path, help="the fleet's device_keys.json")
    worker.add_argument("--fleet-pub", type=Path, help="the fleet's public key (fleet.pub): take only the daemon's "
                        "signed announcements (give it wherever the daemon has --fleet-key)")
    worker.add_argument("--tls-ca", type=Path)
    worker.add_argument("--tls-cert", type=Path)
    worker.add_argument("--tls-key", type=Path)
    worker.add_argument("--connect-timeout", type=float, default=30.0)
    worker.add_argument("--log-level", choices=LOG_LEVELS, default="INFO")
    from .provision import add_provision_parser

    add_provision_parser(commands)
    from .operate import add_parsers

    add_parsers(commands)
    return parser


#: the flags that set a field, with the conversions that are not one to one
FLAGS: FlagMap = (
    ("broker", "serve.broker", None),
    ("cluster_node", "serve.cluster_nodes", tuple),
    ("connect_timeout", "serve.connect_timeout_s", None),
    ("tls_ca", "serve.tls_ca", None),
    ("tls_cert", "serve.tls_cert", None),
    ("tls_key", "serve.tls_key", None),
    ("metrics_port", "serve.metrics_port", None),
    ("metrics_host", "serve.metrics_host", None),
    ("log_level", "serve.log_level", None),
    ("model_manifest", "serve.model_manifest", None),
    ("fleet", "fleet", None),
    ("state_dir", "state_dir", None),
    ("rounds", "rounds", None),
    ("min_devices", "min_devices", None),
    ("round_timeout", "round_timeout_s", None),
    ("join_timeout", "join_timeout_s", None),
    ("adapter", "adapter.kind", None),
    ("algorithm", "train.algorithm", None),
    ("client_optimizer", "train.optimizer", None),
    ("local_epochs", "train.local_epochs", None),
    ("steps", "train.local_steps", None),
    ("batch_size", "train.batch_size", None),
    ("grad_accum", "train.grad_accum", None),
    ("seq_len", "train.seq_len", None),
    ("lr", "train.learning_rate", None),
    ("seed", "seed", None),
    ("seed", "train.seed", None),  # one flag, both seeds
    ("proximal_mu", "train.proximal_mu", None),
    ("eval_blocks", "train.eval_blocks", None),
    ("no_planning", "planning", lambda v: not v),
    ("plan", "plan", None),
    ("strategy", "strategy", None),
    ("merged_rank", "merged_rank", None),
    ("delta_precision", "delta_precision", None),
    ("server_optimizer", "server_optimizer.name", None),  # (β then defaults per optimizer)
    ("server_lr", "server_optimizer.lr", None),
    ("server_momentum", "server_optimizer.momentum", None),
    ("server_beta2", "server_optimizer.beta2", None),
    ("server_tau", "server_optimizer.tau", None),
    ("layout", "layout", None),
    ("candidates", "layout_candidates", _names),
    ("adapter_budget", "adapter_budget", None),
    ("calibration_batches", "importance.batches", None),
    ("calibration_batch_size", "importance.batch_size", None),
    ("linger", "linger_s", lambda v: None if v < 0 else v),
    ("base_model", "base_model", None),
    ("ort_artifacts", "ort_artifacts", None),
    ("device_keys", "device_keys", None),
    ("fleet_key", "fleet_key", None),
    ("admit", "admit", lambda path: _read_admit(path)),
    ("model_from_first_hello", "model_from_first_hello", None),
    ("max_update_norm", "limits.max_norm", None),
    ("norm_action", "limits.norm_action", None),
    ("min_samples", "limits.min_samples", None),
    ("max_samples", "limits.max_samples", None),
    ("max_sample_ratio", "influence.sample_ratio", lambda v: v or None),  # 0: unbounded
    ("max_norm_ratio", "influence.norm_ratio", lambda v: v or None),
    ("max_global_change", "max_global_change", lambda v: v or None),
    ("robust", "robust", None),
    ("trim", "trim", None),
    ("quorum", "quorum", None),
    ("max_staleness", "max_staleness", None),
    ("staleness_exponent", "staleness_exponent", None),
    ("promote", "promote", None),
    ("max_regression", "gate.max_regression", lambda v: None if v < 0 else v),
    ("max_device_regression", "gate.max_device_regression", None),
    ("canary_fraction", "rollout.canary_fraction", None),
    ("max_canary_regression", "rollout.max_canary_regression", None),
)
#: flags of one adapter kind: given for the other kind they are ignored (as they always were)
ADAPTER_FLAGS: dict[str, FlagMap] = {
    "lora": (("rank", "adapter.rank", None), ("alpha", "adapter.alpha", None),
             ("targets", "adapter.target_modules", _names)),
    "prompt": (("prompt_tokens", "adapter.num_virtual_tokens", None), ("prompt_init", "adapter.init", None),
               ("prompt_init_text", "adapter.init_text", None)),
}
#: what the daemon cannot start without: (field path, flag)
REQUIRED = (("serve.broker", "--broker"), ("fleet", "--fleet"), ("state_dir", "--state-dir"))


def settings_from_args(args: argparse.Namespace) -> tuple[AggregatorConfig, ServeSettings]:
    """The fleet's settings and this process's, each field from (last wins) the dataclass's
    default, the ``--config`` file, the flags given."""
    source = SettingsFile(getattr(args, "config", None))
    kind = args.adapter or source.get("adapter.kind", _d("adapter.kind"))
    if args.adapter and kind != source.get("adapter.kind", _d("adapter.kind")):
        source.data.pop("adapter", None)  # the file's table is of the other kind
    for other, flags in ADAPTER_FLAGS.items():
        ignored = [f"--{dest.replace('_', '-')}" for dest, _, _ in flags if getattr(args, dest, None) is not None]
        if other != kind and ignored:
            log.warning("%s: %s adapter settings, ignored for a %s adapter", ", ".join(ignored), other, kind)
    source.override(flags_given(args, (*FLAGS, *ADAPTER_FLAGS.get(kind, ()))))
    source.require(REQUIRED)
    serve = source.build(ServeSettings, table="serve")
    if serve.model_manifest is not None:
        if source.get("model") is not None:
            raise ValueError(f"{source.path}: give the fleet's model as [model] or as [serve] model_manifest, not both")
        flag = "--model-manifest" if "serve.model_manifest" in source.flagged else f"{source.path}: serve.model_manifest"
        source.override({"model": _read_manifest(serve.model_manifest, flag)})
    return source.build(AggregatorConfig, skip=("serve",)), serve


def config_from_args(args: argparse.Namespace) -> AggregatorConfig:
    """The fleet's settings from parsed ``serve`` arguments (``settings_from_args``)."""
    return settings_from_args(args)[0]


def _read_admit(path: Path) -> frozenset[str]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise SystemExit(f"--admit: {exc}") from None
    return frozenset(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))


def _read_manifest(path: Path, where: str = "--model-manifest"):
    from edgetune.wire.manifest_file import read_manifest

    try:
        return read_manifest(path)
    except ValueError as exc:
        raise SystemExit(f"{where}: {exc}") from None


def client_id(state_dir: Path, fleet: str) -> str:
    """The daemon's MQTT client id: the same on every restart (the broker keeps its persistent
    session, with the updates that arrived meanwhile) and random per state dir, because
    Mosquitto lets any client that logs in take over a client id it can guess."""
    from edgetune.atomic import atomic_write_bytes

    path = Path(state_dir) / "client_id"
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = f"edgetune-aggregator-{fleet}-{secrets.token_hex(6)}"
    atomic_write_bytes(path, value.encode() + b"\n")
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # (the level may come from the config file: set once it is read; its warnings show meanwhile)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        if args.command == "provision":
            logging.getLogger().setLevel(args.log_level)
            from .provision import run_provision

            return run_provision(args)
        if args.command in ("versions", "promote", "rollback"):
            from .operate import run

            return run(args)
        if args.command == "worker":
            return run_worker(args)
        config, settings = settings_from_args(args)
        pool = None
        if args.workers or args.workers_elsewhere:
            import dataclasses

            config = dataclasses.replace(config, workers=True)
        if args.workers:
            from .pool import WorkerPool

            common = ["--broker", settings.broker, "--fleet", config.fleet, "--group", f"edgetune-{config.fleet}",
                      "--log-level", settings.log_level]
            common += ["--device-keys", str(config.device_keys)] if config.device_keys else []
            if config.fleet_key:  # (the workers check the daemon's signature with its public half)
                from .pool import write_fleet_pub

                common += ["--fleet-pub", str(write_fleet_pub(config.fleet_key, config.state_dir))]
            for flag, value in (("--tls-ca", settings.tls_ca), ("--tls-cert", settings.tls_cert),
                                ("--tls-key", settings.tls_key)):
                common += [flag, str(value)] if value else []
            pool = WorkerPool(args.workers, common, config.state_dir)
        logging.getLogger().setLevel(settings.log_level)
        # a persistent session: the broker keeps device updates while the daemon reconnects
        transport = open_transport(settings.broker, client_id=client_id(config.state_dir, config.fleet),
                                   cluster_nodes=settings.cluster_nodes, connect_timeout=settings.connect_timeout_s,
                                   clean_session=False, **settings.tls)
        metrics = server = None
        if settings.metrics_port is not None:
            from .metrics import AggregatorMetrics, HealthServer

            metrics = AggregatorMetrics(config.fleet)
            server = HealthServer(metrics, settings.metrics_host, settings.metrics_port)
            server.start()
        aggregator = Aggregator(config, transport, metrics=metrics)
        signal.signal(signal.SIGTERM, lambda *_: aggregator.stop())
        if pool is not None:
            pool.start()
        try:
            aggregator.serve()
        finally:
            if pool is not None:
                pool.stop()
            if server is not None:
                server.close()
    except KeyboardInterrupt:
        log.info("interrupted")
    except (TransportError, ValueError, RuntimeError, OSError) as exc:
        print(f"edgetune-aggregator: error: {exc}", file=sys.stderr)
        return 2
    return 0


def run_worker(args) -> int:
    """``edgetune-aggregator worker``: one worker, until SIGTERM."""
    from .worker import Worker, WorkerConfig

    logging.getLogger().setLevel(args.log_level)
    tls = {k: str(v) for k, v in (("ca_certs", args.tls_ca), ("certfile", args.tls_cert), ("keyfile", args.tls_key)) if v}
    # A clean session: a broker keeps dealing a shared subscription's messages to a member whose
    # persistent session outlives it (a worker stopped for good, or fewer started next time),
    # where nobody takes them. What was dealt to a worker that dies is resent by the devices.
    transport = open_transport(args.broker, client_id=f"edgetune-worker-{args.fleet}-{args.id}",
                               connect_timeout=args.connect_timeout, clean_session=True, protocol="5", **tls)
    worker = Worker(WorkerConfig(args.fleet, args.id, args.state_dir, args.group, args.device_keys, args.fleet_pub),
                    transport)
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    worker.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
