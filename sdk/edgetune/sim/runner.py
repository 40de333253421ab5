"""Run a simulated fleet: the real daemon, real devices, real training; only time is simulated.

Every device is an :class:`edgetune.device.Device` with its own model, data and trainer (the
code ``edgetune device run`` runs), driven by its ``poll`` loop; the daemon is the real
:class:`~edgetune_aggregator.daemon.Aggregator` on its own thread. They meet on an in-memory
broker, or a real one (``broker``). The simulator owns the clock:

1. Time stands still while anyone works. Devices compute one at a time (so each measurement
   has the whole machine), for real; each device's clock advances by the measured durations
   times its slowdown (``edgetune.sim.clock``).
2. When every device and the daemon wait and nothing is in flight, time jumps to the next event:
   a message leaving a device's uplink or arriving over its downlink (``edgetune.sim.network``),
   or the daemon's next timeout. The daemon closes a round at its deadline exactly as it does in
   production, so an update that would arrive after it arrives after it, and is refused.

The method follows FedScale's device traces (Lai et al., "FedScale: Benchmarking Model and
System Performance of Federated Learning at Scale", ICML 2022): a device's round time is its
compute time on its hardware plus its communication time over its link; here the compute is
measured on real training, not drawn from a trace. ``docs/simulation.md`` has the details.

It is one of the few ``edgetune`` modules that import ``edgetune_aggregator``, on purpose: it runs
both sides in one process (``tests/test_layering.py`` lists them).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import atomic_write_json
from .clock import MachineSpeed, SimTime, SimulatedDeviceClock
from .fleet import FleetSpec, SimDevice
from .network import CountingTransport, Link, Network, Scheduler, SimTransport

log = logging.getLogger(__name__)


class SimulationError(RuntimeError):
    """The simulated fleet cannot go on (nothing left to happen, but it has not finished)."""


@dataclass
class SimResult:
    state_dir: Path
    #: the daemon's round log (``rounds.json``)
    rounds: list[dict]
    #: virtual seconds from the first hello to the fleet's end
    duration_s: float
    #: ``simulation.json``: devices, profiles, their compute and traffic in virtual time
    trace: dict = field(default_factory=dict)
    #: real seconds the simulation took
    wall_s: float = 0.0


def device_texts(spec: FleetSpec) -> dict[str, list[str]]:
    """Each device's records, from its data source (``edgetune.sim.fleet``)."""
    from ..data import generate_device_texts, load_texts
    from ..data.fortunes import load_category

    texts = {}
    for index, device in enumerate(spec.devices):
        source = device.data
        if source == "generated":
            texts[device.device_id] = generate_device_texts(index, spec.records, seed=spec.seed)
        elif source.startswith("fortunes:"):
            texts[device.device_id] = load_category(source.split(":", 1)[1])
        else:
            texts[device.device_id] = load_texts(spec.root / source)
    return texts


def build_workloads(spec: FleetSpec, threads: int | None = None, texts: dict[str, list[str]] | None = None) -> dict:
    """One :class:`~edgetune.workload.Workload` per device, split as ``Device.join`` splits
    (held-out fraction and seed from the device id), each with its own copy of the base (a
    trainer wraps its base in place) and the other devices' held-out records as its robustness
    set. Reusable across simulations of the same fleet (the benchmark's arms)."""
    from ..data import split_heldout
    from ..device import hash_seed
    from ..workload import Workload

    texts = texts or device_texts(spec)
    heldout = {d: split_heldout(t, spec.heldout, seed=hash_seed(d))[1] for d, t in texts.items()}
    workloads = {}
    for device in spec.devices:
        others = [r for other, records in heldout.items() if other != device.device_id for r in records]
        workloads[device.device_id] = Workload.load(texts[device.device_id], spec.model, spec.heldout,
                                                    seed=hash_seed(device.device_id), threads=threads,
                                                    robustness=others)
    return workloads


def aggregator_config(spec: FleetSpec, state_dir: Path, devices: int | None = None, **overrides):
    """The daemon's settings for ``spec`` (its ``aggregator`` section, then ``overrides``)."""
    from edgetune_aggregator.config import AggregatorConfig
    from edgetune_aggregator.strategies import DEFAULT_SERVER_OPTIMIZER, ServerOptimizerConfig

    from ..wire import LoraSpec, TrainSettings

    from ..wire import ImportanceSettings

    agg = {**spec.aggregator, **overrides}
    if "calibration_batches" in agg:
        agg["importance"] = ImportanceSettings(batches=int(agg.pop("calibration_batches")))
    if "plan_mode" in agg:  # (a Simulation's own ``plan`` says whether devices send profiles)
        agg["plan"] = agg.pop("plan_mode")
    momentum = agg.pop("server_momentum", None)
    optimizer = ServerOptimizerConfig(agg.pop("server_optimizer", DEFAULT_SERVER_OPTIMIZER.name),
                                      float(agg.pop("server_lr", 1.0)), None if momentum is None else float(momentum))
    return AggregatorConfig(
        fleet=spec.name,
        state_dir=state_dir,
        rounds=spec.rounds,
        round_timeout_s=spec.deadline_s,
        join_timeout_s=None,
        adapter=LoraSpec(rank=spec.rank, alpha=spec.alpha, target_modules=spec.targets),
        train=TrainSettings(local_steps=spec.steps, batch_size=spec.batch_size, seq_len=spec.seq_len,
                            learning_rate=spec.learning_rate, eval_blocks=spec.eval_blocks,
                            grad_accum=spec.grad_accum, seed=spec.seed),
        seed=spec.seed,
        server_optimizer=optimizer,
        min_devices=int(agg.pop("min_devices", 1)),
        # the whole simulated fleet is there before round 1 (their hellos were delivered first)
        start_devices=int(agg.pop("start_devices", len(spec.devices) if devices is None else devices)),
        # close a round as soon as every device it asked answered, else at the deadline
        quorum=agg.pop("quorum", 1.0),
        linger_s=0.0,
        **agg,
    )


class Simulation:
    """One run of a simulated fleet; ``run()`` returns when the daemon has finished."""

    def __init__(self, spec: FleetSpec, out: Path, *, broker: str | None = None, workloads: dict | None = None,
                 speed: MachineSpeed | None = None, threads: int | None = None, plan: bool = True,
                 devices: list[SimDevice] | None = None, **overrides):
        self.spec = spec
        self.out = Path(out)
        self.broker = broker
        self.threads = threads
        #: devices send their profile (the planner is on); False: the fleet's uniform settings
        self.plan = plan
        self.sim_devices = devices or list(spec.devices)
        self.workloads = workloads
        self.speed = speed or MachineSpeed(threads)
        self.overrides = overrides
        self.time = SimTime()
        self.scheduler = Scheduler()
        self.network = Network(self.scheduler, self.time, settle_s=0.03 if broker else 0.0)
        self.devices: dict[str, object] = {}
        self.clocks: dict[str, SimulatedDeviceClock] = {}
        self.transports: dict[str, SimTransport] = {}
        self.aggregator = None
        self.fleet_model = None  # the manifest the daemon is pinned to (the devices' model)
        self._thread: threading.Thread | None = None
        self._active: dict[str, object] = {}
        self._done_at: float | None = None
        #: simulated seconds devices get, after the daemon finished, to receive its last messages
        self.linger_s = 2 * spec.deadline_s

    # --- setup ----------------------------------------------------------------------------

    def _url(self) -> str:
        return self.broker or f"memory://sim-{uuid.uuid4().hex[:10]}"

    def _make_devices(self, url: str) -> None:
        from ..device import Device, DeviceConfig
        from ..transport import open_transport

        workloads = self.workloads or build_workloads(self.spec, self.threads)
        # the simulator is the fleet's operator: it pins the model its devices load
        self.fleet_model = workloads[self.sim_devices[0].device_id].manifest
        for sim in self.sim_devices:
            clock = SimulatedDeviceClock(self.time, self.speed.slowdown(sim.profile))
            inner = open_transport(url, client_id=f"sim-{self.spec.name}-{sim.device_id}", connect_timeout=30)
            transport = SimTransport(inner, self.network, clock, Link(sim.profile.uplink_mbps, sim.profile.downlink_mbps))
            config = DeviceConfig(self.spec.name, sim.device_id, profile=sim.profile if self.plan else None,
                                  resend_after_s=max(60.0, 2 * self.spec.deadline_s))
            device = Device(config, transport, workloads[sim.device_id], clock)
            device.memory_gauge = _memory_gauge(clock, workloads[sim.device_id], self.speed)
            transport.round_of = lambda d=device: d.task.round if d.task else None
            self.devices[sim.device_id], self.clocks[sim.device_id] = device, clock
            self.transports[sim.device_id] = transport
        for device in self.devices.values():
            device.connect()
        self._active = dict(self.devices)

    def _start_aggregator(self, url: str) -> None:
        from edgetune_aggregator.daemon import Aggregator

        from ..transport import open_transport

        # the simulated fleet is a known list of devices (an admitted fleet: each one it asks holds
        # a round open until the deadline, as a provisioned deployment's devices do)
        admit = frozenset(d.device_id for d in self.sim_devices)
        config = aggregator_config(self.spec, self.out / "state", len(self.sim_devices),
                                   **{"model": self.fleet_model, "admit": admit, **self.overrides})
        transport = CountingTransport(open_transport(url, client_id=f"sim-{self.spec.name}-aggregator",
                                                     connect_timeout=30), self.network)
        self.aggregator = Aggregator(config, transport, clock=self.time)
        self._thread = threading.Thread(target=self._serve, name="sim-aggregator", daemon=True)
        self._thread.start()
        if not self.aggregator.ready.wait(60):
            raise SimulationError("the aggregator did not connect to the broker")

    def _serve(self) -> None:
        try:
            self.aggregator.serve()
        except Exception:  # (the loop reports it: nothing will happen any more)
            log.exception("the simulated fleet's aggregator failed")
            self._failed = True

    # --- the event loop ---------------------------------------------------------------------

    def run(self) -> SimResult:
        started = time.monotonic()
        self._failed = False
        url = self._url()
        self.out.mkdir(parents=True, exist_ok=True)
        self.speed.refresh(force=True)
        self._make_devices(url)
        self._loop(lambda: len(self.scheduler) == 0)  # every hello has arrived: the fleet exists
        self._start_aggregator(url)
        try:
            self._loop(self._finished)
        finally:
            if self.aggregator is not None:
                self.aggregator.stop()
            if self._thread is not None:
                self._thread.join(30)
            for device in self._active.values():
                device.close()
        if self._failed:
            raise SimulationError("the aggregator failed; see the log")
        store = self.aggregator.store
        trace = self._trace()
        atomic_write_json(self.out / "state" / "simulation.json", trace)
        return SimResult(store.directory, store.rounds(), self.time.monotonic(), trace, time.monotonic() - started)

    def _finished(self) -> bool:
        """The daemon is done and what it last sent has arrived. Devices still busy with their own
        traffic then (a slow link resending) cannot change the result: after ``linger_s`` of
        simulated time they are stopped."""
        if self._thread is None or self._thread.is_alive():
            return False
        if self._done_at is None:
            self._done_at = self.time.monotonic()
        return len(self.scheduler) == 0 or self.time.monotonic() - self._done_at > self.linger_s

    def _loop(self, done) -> None:
        while True:
            self._settle()
            if done():
                return
            wake = min(self.scheduler.next_time(), self._aggregator_wake())
            if wake == float("inf"):
                raise SimulationError("nothing is scheduled, yet the fleet has not finished")
            self.time.advance(wake)
            for action in self.scheduler.due(wake):
                action()

    def _settle(self) -> None:
        """Let every device act on what it received, and the daemon on what it received,
        until all of them wait and nothing is in flight."""
        while True:
            worked = False
            for device_id, device in list(self._active.items()):
                while device.has_messages:
                    worked = True
                    if device.poll(0):
                        device.close()
                        del self._active[device_id]
                        break
            if worked:
                continue
            if not self.network.quiet or not self._aggregator_idle():
                time.sleep(0.0005)
                continue
            if not any(d.has_messages for d in self._active.values()):
                return

    def _aggregator_idle(self) -> bool:
        if self.aggregator is None or self._thread is None or not self._thread.is_alive():
            return True
        inbox = self.aggregator.inbox
        waiting = inbox.waiting
        return waiting is not None and waiting[0] == self.time.monotonic() and inbox.empty

    def _aggregator_wake(self) -> float:
        if self.aggregator is None or self._thread is None or not self._thread.is_alive():
            return float("inf")
        waiting = self.aggregator.inbox.waiting
        return waiting[1] if waiting is not None else self.time.monotonic()

    # --- what happened ----------------------------------------------------------------------

    def _trace(self) -> dict:
        """Per device: its class and profile, its compute blocks, what it sent and when."""
        devices = {}
        for sim in self.sim_devices:
            transport, clock = self.transports[sim.device_id], self.clocks[sim.device_id]
            devices[sim.device_id] = {
                "class": sim.profile.name,
                "profile": dataclasses.asdict(sim.profile),
                "data": sim.data,
                "slowdown_float32": round(clock.slowdown("float32"), 3),
                "compute": clock.blocks,
                "sent": [{"topic": t.rsplit("/", 2)[-2], "round": r, "bytes": n, "start": round(a, 3),
                          "arrives": round(b, 3)} for t, n, a, b, r in transport.sent if n > 0],
                "upload_s": round(transport.link.up_seconds, 3),
                "download_s": round(transport.link.down_seconds, 3),
                "received_bytes": transport.stats.snapshot()[1],
            }
        return {"fleet": self.spec.name, "deadline_s": self.spec.deadline_s, "epoch": self.time.epoch,
                "machine_gflops": {d: round(v, 1) for d, v in self.speed.measured.items()},
                "duration_s": round(self.time.monotonic(), 3), "devices": devices}


def _memory_gauge(clock: SimulatedDeviceClock, workload, speed: MachineSpeed):
    """A device's resident memory as if it ran alone: what a process holding its base needs at
    rest (the cost model's fitted overhead plus the base's tensors) plus what this process grew
    by since the device began its compute. Approximate: freed memory the allocator keeps from
    another device's round can hide some growth."""
    from ..backoff import resident_bytes
    from ..planning.costmodel import Calibration

    overhead = Calibration.load().overhead_bytes
    state = {"mark": resident_bytes()}

    def at_rest() -> int:
        model = getattr(workload.loaded, "model", None)
        if model is None:
            return 0
        return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))

    def before(dtype: str) -> None:
        speed.before_compute(dtype)  # (this machine's speed now, for the slowdown)
        state["mark"] = resident_bytes()

    clock.on_compute = before
    return lambda: int(overhead + at_rest() + max(0, resident_bytes() - state["mark"]))


__all__ = ["SimResult", "Simulation", "SimulationError", "aggregator_config", "build_workloads", "device_texts"]
