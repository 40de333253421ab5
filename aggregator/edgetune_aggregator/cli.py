"""``edgetune-aggregator serve``: run a fleet's rounds against an MQTT broker.

    edgetune-aggregator serve --broker mqtt://HOST:PORT --fleet NAME --state-dir DIR \\
        [--min-devices N] [--round-timeout S] [--rounds R]

Restarting with the same ``--state-dir`` resumes after the last closed round.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from edgetune import __version__
from edgetune.transport import TransportError, open_transport
from edgetune.wire import LoraSpec, TrainSettings

from .daemon import Aggregator, AggregatorConfig

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
    group.add_argument("--rank", type=int, default=8)
    group.add_argument("--alpha", type=float, default=16.0)
    group.add_argument("--targets", default="q_proj,v_proj", help="comma-separated module names")
    group.add_argument("--steps", type=int, default=10, help="optimizer steps per device per round")
    group.add_argument("--batch-size", type=int, default=4)
    group.add_argument("--grad-accum", type=int, default=1)
    group.add_argument("--seq-len", type=int, default=128)
    group.add_argument("--lr", type=float, default=1e-3)
    group.add_argument("--seed", type=int, default=0)
    serve.add_argument("--base-model", default="", help="recorded in the exported PEFT adapter_config.json")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
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
        adapter=LoraSpec(rank=args.rank, alpha=args.alpha, target_modules=targets),
        train=TrainSettings(
            local_steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
            seq_len=args.seq_len, learning_rate=args.lr, seed=args.seed,
        ),
        seed=args.seed,
        base_model=args.base_model,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        config = config_from_args(args)
        # a persistent session: the broker keeps device updates while the daemon reconnects
        transport = open_transport(args.broker, client_id=f"edgetune-aggregator-{args.fleet}",
                                   connect_timeout=args.connect_timeout, clean_session=False)
        aggregator = Aggregator(config, transport)
        signal.signal(signal.SIGTERM, lambda *_: aggregator.stop())
        aggregator.serve()
    except KeyboardInterrupt:
        log.info("interrupted")
    except (TransportError, ValueError, RuntimeError) as exc:
        print(f"edgetune-aggregator: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
