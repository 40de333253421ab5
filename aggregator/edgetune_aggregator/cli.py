"""``edgetune-aggregator serve``: run a fleet's rounds against an MQTT broker.

    edgetune-aggregator serve --broker mqtt://HOST:PORT --fleet NAME --state-dir DIR \\
        [--min-devices N] [--round-timeout S] [--rounds R] \
        [--strategy auto|fedit|hetlora|stack|svd] [--server-optimizer fedavg|fedavgm|fedadam|fedyogi] \
        [--layout fixed|importance] [--proximal-mu MU] [--adapter lora|prompt --prompt-tokens N] \
        [--algorithm fedavg|fedsgd] [--client-optimizer adamw|sgd] [--local-epochs E]

    edgetune-aggregator provision --fleet NAME --devices N --out DIR   (CA, certificates, ACL, keys)

Restarting with the same ``--state-dir`` resumes the round that was open (docs/reliability.md).
"""

from __future__ import annotations

import argparse
import logging
import secrets
import signal
import sys
from pathlib import Path

from edgetune import __version__
from edgetune.transport import TransportError, open_transport
from edgetune.adapters.registry import KINDS, spec_from_dict
from edgetune.wire import ALGORITHMS, CLIENT_OPTIMIZERS, PROMPT_INITS, ImportanceSettings, TrainSettings

from .daemon import DEFAULT_CANDIDATES, Aggregator, AggregatorConfig
from .influence import InfluenceBounds
from .strategies import DEFAULT_SERVER_OPTIMIZER, SERVER_OPTIMIZERS, STRATEGIES, ServerOptimizerConfig
from .strategies.robust import ROBUST_METHODS
from .validation import NORM_ACTIONS, UpdateLimits

log = logging.getLogger("edgetune_aggregator")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgetune-aggregator", description="edgetune aggregator daemon")
    parser.add_argument("--version", action="version", version=f"edgetune-aggregator {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run federated rounds for one fleet")
    serve.add_argument("--broker", required=True, help="mqtt://HOST:PORT or mqtts://HOST:PORT")
    serve.add_argument("--fleet", required=True)
    serve.add_argument("--state-dir", required=True, type=Path)
    serve.add_argument("--min-devices", type=int, default=1, help="updates needed to close a round (default 1)")
    serve.add_argument("--round-timeout", type=float, default=600.0, help="seconds before a round closes anyway")
    serve.add_argument("--join-timeout", type=float, default=None, help="seconds to wait for the first devices (default: forever)")
    serve.add_argument("--rounds", type=int, default=None, help="train rounds, then evaluate and exit (default: run forever)")
    serve.add_argument("--connect-timeout", type=float, default=None, help="give up on the broker after S seconds (default: retry forever)")
    group = serve.add_argument_group("adapter and local training (sent to devices in each task)")
    group.add_argument("--adapter", default="lora", choices=list(KINDS),
                       help="lora: low-rank factors on --targets; prompt: a soft prompt of --prompt-tokens")
    group.add_argument("--rank", type=int, default=8)
    group.add_argument("--alpha", type=float, default=16.0)
    group.add_argument("--targets", default="q_proj,v_proj", help="comma-separated module names")
    group.add_argument("--prompt-tokens", type=int, default=20, help="virtual tokens of a soft prompt")
    group.add_argument("--prompt-init", default="vocab", choices=PROMPT_INITS,
                       help="start a soft prompt from random vocabulary tokens' embeddings, Gaussian vectors of the "
                       "embeddings' scale, or --prompt-init-text's embeddings")
    group.add_argument("--prompt-init-text", default="", help="text whose token embeddings start the prompt")
    group.add_argument("--algorithm", default="fedavg", choices=ALGORITHMS,
                       help="fedavg: devices train --steps (or --local-epochs) and send the change; fedsgd: devices "
                       "send one gradient and the server steps with --server-lr")
    group.add_argument("--client-optimizer", default="adamw", choices=CLIENT_OPTIMIZERS)
    group.add_argument("--local-epochs", type=int, default=0, help="passes over each device's data per round "
                       "(instead of --steps; 0: use --steps)")
    group.add_argument("--steps", type=int, default=10, help="optimizer steps per device per round")
    group.add_argument("--batch-size", type=int, default=4)
    group.add_argument("--grad-accum", type=int, default=1)
    group.add_argument("--seq-len", type=int, default=128)
    group.add_argument("--lr", type=float, default=1e-3)
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--proximal-mu", type=float, default=0.0, help="FedProx: mu/2·‖θ − θ_global‖² in the local loss (default 0: off)")
    group.add_argument("--no-planning", action="store_true", help="ignore device profiles: every device trains with these settings")
    group.add_argument("--plan", default="auto", choices=["auto", "weakest", "uniform"],
                       help="auto: each device its best configuration; weakest: the one configuration every device "
                       "can run; uniform: these settings for all, devices they do not fit sit out (docs/planner.md)")
    group.add_argument("--eval-blocks", type=int, default=16, help="held-out blocks each device evaluates per round")
    merge = serve.add_argument_group("aggregation")
    merge.add_argument("--strategy", default="auto", choices=["auto", *STRATEGIES],
                       help="how adapters of different ranks are merged (auto: hetlora when planning, else fedit)")
    merge.add_argument("--merged-rank", type=int, default=None, help="stack/svd: components per layer of the frozen "
                       "merged delta devices download (default: --rank, so at most 2× fedit's downlink; -1: unbounded)")
    merge.add_argument("--server-optimizer", default=DEFAULT_SERVER_OPTIMIZER.name, choices=SERVER_OPTIMIZERS,
                       help="how a round's merged update moves the global (default fedavgm: server momentum, "
                       "the fleet benchmark's best; fedavg with --server-lr 1 is plain FedAvg)")
    merge.add_argument("--server-lr", type=float, default=1.0, help="server learning rate")
    merge.add_argument("--server-momentum", type=float, default=None,
                       help="fedavgm's beta (default 0.5), fedadam/fedyogi's beta1 (default 0.9)")
    merge.add_argument("--server-beta2", type=float, default=0.99)
    merge.add_argument("--server-tau", type=float, default=1e-3)
    layout = serve.add_argument_group("adapter layout")
    layout.add_argument("--layout", default="fixed", choices=["fixed", "importance"],
                        help="importance: a calibration round scores every candidate matrix and picks those that "
                        "get adapters (docs/importance.md)")
    layout.add_argument("--candidates", default=",".join(DEFAULT_CANDIDATES), help="matrix names an importance layout chooses among")
    layout.add_argument("--adapter-budget", type=int, default=None,
                        help="adapter parameters the importance layout may use (default: those of --targets at --rank)")
    layout.add_argument("--calibration-batches", type=int, default=8, help="batches each device scores")
    layout.add_argument("--calibration-batch-size", type=int, default=2, help="blocks per scoring batch, at most")
    serve.add_argument("--linger", type=float, default=0.0, help="after the last round, keep recording devices' "
                       "personalization reports for S seconds (negative: until stopped)")
    serve.add_argument("--base-model", default="", help="recorded in the exported PEFT adapter_config.json")
    serve.add_argument("--ort-artifacts", type=Path, help="ONNX Runtime training artifacts (edgetune build-ort) to "
                       "serve over MQTT to devices without PyTorch (docs/ort.md)")
    security = serve.add_argument_group("security and robustness (docs/security.md)")
    security.add_argument("--device-keys", type=Path, help="the fleet's device_keys.json (edgetune-aggregator "
                          "provision): devices must sign hellos and results with their Ed25519 keys")
    security.add_argument("--tls-ca", help="CA certificate of an mqtts:// broker")
    security.add_argument("--tls-cert", help="this daemon's client certificate (brokers that require one)")
    security.add_argument("--tls-key", help="the private key of --tls-cert")
    security.add_argument("--admit", type=Path, help="a file of device ids, one a line: only they may join "
                          "(for fleets without --device-keys; with them, the key file is the list)")
    security.add_argument("--model-manifest", type=Path, help="the fleet's model: a file 'edgetune manifest --model M' "
                          "wrote; hellos for another model are refused (default: SmolLM2-135M-Instruct, the default model)")
    security.add_argument("--model-from-first-hello", action="store_true", help="take the fleet's model from the "
                          "first device that says hello (trusted labs only: one device then decides for all)")
    security.add_argument("--max-update-norm", type=float, default=None, help="L2 bound on each update's delta")
    security.add_argument("--norm-action", default="clip", choices=NORM_ACTIONS,
                          help="an update over --max-update-norm is scaled onto the bound (clip) or refused")
    security.add_argument("--min-samples", type=int, default=1, help="fewest samples an update may claim")
    security.add_argument("--max-samples", type=int, default=10_000_000,
                          help="most samples an update may claim (its weight in the average)")
    security.add_argument("--max-sample-ratio", type=float, default=4.0, help="an update's claimed samples count at "
                          "most this multiple of the round's median claim (0: unbounded, the old behaviour)")
    security.add_argument("--max-norm-ratio", type=float, default=5.0, help="an update's delta is clipped at this "
                          "multiple of the round's median norm (0: unbounded, the old behaviour)")
    security.add_argument("--max-global-change", type=float, default=10.0, help="refuse to publish a global that "
                          "moves more than this multiple of what the round's typical (lower median) update moves alone (0: check only "
                          "that it is finite and of the fleet's layout)")
    security.add_argument("--robust", default=None, choices=ROBUST_METHODS,
                          help="coordinate-wise median or trimmed mean instead of the weighted mean (fedit, dense)")
    security.add_argument("--trim", type=float, default=0.1, help="fraction trimmed at each end by --robust trimmed_mean")
    security.add_argument("--quorum", type=float, default=None, help="close a round once this fraction of the "
                          "devices it asked answered (at least --min-devices); default: at --min-devices")
    security.add_argument("--max-staleness", type=int, default=0, help="fold an update that arrives after its "
                          "round closed into the open round if its global is at most this many versions old "
                          "(FedBuff-style; fedit/dense; default 0: refuse late updates)")
    security.add_argument("--staleness-exponent", type=float, default=0.5,
                          help="a late update's weight is multiplied by (1 + lag)^-exponent")
    security.add_argument("--metrics-port", type=int, default=None, help="serve /metrics (Prometheus) and /healthz "
                          "on this port (0: any free port)")
    security.add_argument("--metrics-host", default="127.0.0.1", help="address for --metrics-port")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    from .provision import add_provision_parser

    add_provision_parser(commands)
    return parser


def config_from_args(args: argparse.Namespace) -> AggregatorConfig:
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    return AggregatorConfig(
        fleet=args.fleet,
        state_dir=args.state_dir,
        rounds=args.rounds,
        min_devices=args.min_devices,
        round_timeout_s=args.round_timeout,
        join_timeout_s=args.join_timeout,
        # each kind takes the flags that are its fields (a LoRA its rank, a prompt its tokens)
        adapter=spec_from_dict({"kind": args.adapter, "rank": args.rank, "alpha": args.alpha, "target_modules": targets,
                                "num_virtual_tokens": args.prompt_tokens, "init": args.prompt_init,
                                "init_text": args.prompt_init_text}),
        train=TrainSettings(
            local_steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
            seq_len=args.seq_len, learning_rate=args.lr, seed=args.seed, proximal_mu=args.proximal_mu,
            optimizer=args.client_optimizer, algorithm=args.algorithm, local_epochs=args.local_epochs,
            eval_blocks=args.eval_blocks,
        ),
        seed=args.seed,
        base_model=args.base_model,
        planning=not args.no_planning,
        plan=args.plan,
        merged_rank=args.merged_rank,
        strategy=args.strategy,
        server_optimizer=ServerOptimizerConfig(args.server_optimizer, args.server_lr, args.server_momentum,
                                               args.server_beta2, args.server_tau),
        layout=args.layout,
        layout_candidates=tuple(c.strip() for c in args.candidates.split(",") if c.strip()),
        adapter_budget=args.adapter_budget,
        importance=ImportanceSettings(batches=args.calibration_batches, batch_size=args.calibration_batch_size),
        ort_artifacts=args.ort_artifacts,
        linger_s=None if args.linger < 0 else args.linger,
        device_keys=args.device_keys,
        limits=UpdateLimits(args.max_update_norm, args.norm_action, args.min_samples, args.max_samples),
        influence=InfluenceBounds(args.max_sample_ratio or None, args.max_norm_ratio or None),
        max_global_change=args.max_global_change or None,
        model=_read_manifest(args.model_manifest) if args.model_manifest else None,
        model_from_first_hello=args.model_from_first_hello,
        admit=_read_admit(args.admit) if args.admit else None,
        robust=args.robust,
        trim=args.trim,
        quorum=args.quorum,
        max_staleness=args.max_staleness,
        staleness_exponent=args.staleness_exponent,
    )


def _read_admit(path: Path) -> frozenset[str]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise SystemExit(f"--admit: {exc}") from None
    return frozenset(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))


def _read_manifest(path: Path):
    from edgetune.wire.manifest_file import read_manifest

    try:
        return read_manifest(path)
    except ValueError as exc:
        raise SystemExit(f"--model-manifest: {exc}") from None


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
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        if args.command == "provision":
            from .provision import run_provision

            return run_provision(args)
        config = config_from_args(args)
        # a persistent session: the broker keeps device updates while the daemon reconnects
        tls = {"ca_certs": args.tls_ca, "certfile": args.tls_cert, "keyfile": args.tls_key}
        transport = open_transport(args.broker, client_id=client_id(args.state_dir, args.fleet),
                                   connect_timeout=args.connect_timeout, clean_session=False,
                                   **{k: v for k, v in tls.items() if v})
        metrics = server = None
        if args.metrics_port is not None:
            from .metrics import AggregatorMetrics, HealthServer

            metrics = AggregatorMetrics(args.fleet)
            server = HealthServer(metrics, args.metrics_host, args.metrics_port)
            server.start()
        aggregator = Aggregator(config, transport, metrics=metrics)
        signal.signal(signal.SIGTERM, lambda *_: aggregator.stop())
        try:
            aggregator.serve()
        finally:
            if server is not None:
                server.close()
    except KeyboardInterrupt:
        log.info("interrupted")
    except (TransportError, ValueError, RuntimeError, OSError) as exc:
        print(f"edgetune-aggregator: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
