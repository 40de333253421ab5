"""The device side of a fleet: what an edge application embeds.

A :class:`Device` announces itself, follows the retained round task and global adapter, trains
when told, sends only the adapter delta, and keeps the newest global adapter for the
application to use. Training failures become :class:`ErrorReport` messages, never exceptions
in the application around it.

It is the fleet's protocol (``edgetune.protocol``) driven by the worker that trains with a real
model (``edgetune.worker``), plus what an application asks of its device beyond the rounds:
``join`` (load, measure, connect), personalization and the adapter it serves.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from .clock import DeviceClock
from .protocol import DeadlineMissed, DeviceConfig, DeviceProtocol
from .transport import Transport, open_transport
from .wire import DevicePlan, DeviceProfile
from .worker import WorkloadWorker, hash_seed
from .workload import Workload

log = logging.getLogger(__name__)

__all__ = ["DeadlineMissed", "Device", "DeviceConfig", "announced_profile", "client_id", "hash_seed"]


class Device(DeviceProtocol):
    """One device in a fleet. ``run()`` blocks; ``start()`` runs it on a background thread."""

    def __init__(self, config: DeviceConfig, transport: Transport, workload: Workload,
                 clock: DeviceClock | None = None):
        clock = clock or DeviceClock()
        worker = WorkloadWorker(workload, config.device_id, clock, config.profile, config.max_eval_blocks)
        super().__init__(config, transport, worker, clock)
        self.workload = workload
        #: the personal adapter of the last ``personalize`` (None before), and whether it is served
        self.personal_adapter = None
        self.serving = "global"

    @property
    def memory_gauge(self):
        """Resident bytes of this device now, checked against its profile's memory each step."""
        return self.worker.memory_gauge

    @memory_gauge.setter
    def memory_gauge(self, gauge) -> None:
        self.worker.memory_gauge = gauge

    @property
    def last_plan(self) -> DevicePlan | None:
        """The plan this device last trained with (after any back-off): personalization's too."""
        return self.worker.last_plan

    @classmethod
    def join(
        cls,
        broker: str,
        fleet: str,
        device_id: str,
        data: str | Path | list[str],
        model: str | None = None,
        **options,
    ) -> Device:
        """Load the model and data, and connect: the one call an edge application needs.

        ``trainer="ort"`` (or ``"auto"`` without PyTorch) trains ONNX Runtime ``artifacts``,
        downloaded from the aggregator first when the folder holds none (docs/ort.md).
        ``robustness`` (a file or records) is the other sites' held-out text the operator
        gives this device, for the robustness score (docs/personalization.md).

        The device is planned for: without a ``profile`` it measures itself on its first start
        and caches the result in ``state_dir`` (default ``~/.local/state/edgetune/FLEET/ID``;
        ``reprofile=True`` measures again), and the aggregator picks its rank, base precision,
        batch size and steps. ``emulate`` (a profile, or its YAML file) makes it behave as that
        slower device class: its memory budget and its speed (docs/simulation.md).
        ``plan=False`` sends no profile: the device trains the fleet's uniform settings."""
        from .workload import choose_backend

        trainer, artifacts = options.pop("trainer", "auto"), options.pop("artifacts", None)
        model_hash, robustness = options.pop("model_hash", None), options.pop("robustness", None)
        tls = {k: str(options.pop(k)) for k in ("ca_certs", "certfile", "keyfile") if options.get(k) is not None}
        for k in ("ca_certs", "certfile", "keyfile"):
            options.pop(k, None)
        plan, state_dir = options.pop("plan", True), options.pop("state_dir", None)
        reprofile, emulate, threads = options.pop("reprofile", False), options.pop("emulate", None), options.pop("threads", None)
        given = options.pop("profile", None)
        from .profiling.auto import default_state_dir

        config = DeviceConfig(fleet, device_id, state_dir=Path(state_dir) if state_dir is not None
                              else default_state_dir(fleet, device_id), **options)
        if choose_backend(trainer, artifacts) == "ort":
            from .ort.fetch import ensure_artifacts

            ensure_artifacts(broker, fleet, device_id, Path(artifacts), fleet_key=config.fleet_key, **tls)
        workload = Workload.load(data, model, config.heldout_fraction, seed=hash_seed(device_id), trainer=trainer,
                                 artifacts=artifacts, model_hash=model_hash, robustness=robustness, threads=threads)
        # A persistent session: the broker queues the task and global adapter for this
        # device while it is offline, and paho resends unacknowledged results on reconnecting.
        transport = open_transport(broker, client_id=client_id(fleet, device_id, config.signing_key),
                                   clean_session=False, **tls)
        profile, clock = announced_profile(fleet, device_id, plan=plan, profile=given, state_dir=state_dir,
                                           reprofile=reprofile, emulate=emulate, threads=threads)
        device = cls(dataclasses.replace(config, profile=profile), transport, workload, clock)
        device.connect()
        return device

    # --- personalization (docs/personalization.md) ------------------------------------------

    def personalize(self, settings=None, report: bool = True):
        """Fine-tune the global version this device serves (the fleet's promoted one; the
        newest global before any is promoted) on its data and keep the result as its personal
        adapter. It serves it (``serving == "personal"``) only if, on its own validation split,
        it does no worse than that global version; else it keeps serving the global one (the
        personal adapter is kept: ``use_personal``). Returns the
        :class:`~edgetune.wire.PersonalizationReport` (also sent to the aggregator unless
        ``report`` is False). Safe to call between rounds while ``run()`` goes on."""
        from .personalize import PersonalizeSettings, personalize

        settings = settings or PersonalizeSettings()
        base = self.promoted.adapter or self.global_adapter
        if base is None:
            raise RuntimeError("no global adapter yet: join a fleet and wait for one (wait_for_global)")
        if report and self._closed:
            raise RuntimeError("this device left the fleet (run() returns when the fleet finishes and disconnects): "
                               "personalize before, keep it connected with DeviceConfig(exit_when_finished=False), "
                               "or pass report=False")
        plan = self.last_plan  # what its memory affords, as the planner (and any back-off) found
        with self.worker.lock:
            personal, result = personalize(self.workload, base, settings, self.config.device_id,
                                           max_eval_blocks=self.config.max_eval_blocks,
                                           quantization=plan.quantization if plan else "float32",
                                           rank=plan.rank if plan else None,
                                           checkpointing=plan.gradient_checkpointing if plan else False)
        self.personal_adapter = personal
        if personal.better_than_global:
            self.serving = "personal"
        else:
            self.serving = "global"
            log.warning("%s: the personal adapter does worse than global v%d on this device's validation split "
                        "(ppl %.3f vs %.3f): serving the global version (use_personal() serves it anyway)",
                        self.config.device_id, base.version, personal.validation_ppl, personal.global_validation_ppl)
        if report:
            with self._send_lock:  # run() may have left the fleet while this trained
                if self._closed:
                    raise RuntimeError("the device left the fleet while personalizing (run() returned): the "
                                       "personal adapter is kept and served, but the report was not sent")
                self.channel.send(self.topics.personal(self.config.device_id), result)
                self._flush()
        return result

    def use_personal(self) -> None:
        """Serve the personal adapter (after ``personalize``)."""
        if self.personal_adapter is None:
            raise RuntimeError("no personal adapter: call personalize() first")
        self.serving = "personal"

    def rollback(self) -> None:
        """Serve the fleet's global version again (the promoted one, which the fleet may move on,
        ``promoted.py``); the personal one is kept (``use_personal``)."""
        self.serving = "global"

    def serving_adapter(self) -> tuple[object, dict, dict]:
        """``(spec, tensors, merged)`` of the adapter this device serves now: its personal
        adapter where it serves that, else the global version the fleet promoted for it
        (``promoted.py``), else (no version promoted yet) the newest global adapter."""
        if self.serving == "personal" and self.personal_adapter is not None:
            p = self.personal_adapter
            return p.spec, p.tensors, p.merged
        g = self.promoted.adapter or self.global_adapter
        if g is None:
            raise RuntimeError("no adapter yet")
        return g.adapter, g.tensors, g.merged

    def generate(self, prompt: str, max_new_tokens: int = 32) -> str:
        """Greedy text from the base with the adapter this device serves (``serving_adapter``):
        inference on the device, between rounds (it waits for a round's training to finish).
        PyTorch devices; an ONNX Runtime device exports instead (docs/ort.md)."""
        import torch

        spec, tensors, merged = self.serving_adapter()
        with self.worker.lock:
            trainer = self.workload.trainer(spec)
            trainer.set_adapter(tensors)
            trainer.set_merged(merged)
            tokenizer = self.workload.loaded.tokenizer
            ids = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long)
            with torch.no_grad():
                out = trainer.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                             max_new_tokens=max_new_tokens,
                                             pad_token_id=getattr(tokenizer, "eos_token_id", None))
        return tokenizer.decode(out[0, ids.shape[1]:].tolist())

    def save_adapter(self, directory: Path, base_model: str = "") -> Path:
        """Write the adapter served now in PEFT format (``PeftModel.from_pretrained`` loads it)."""
        from .adapters.peft_format import write_peft_adapter

        spec, tensors, merged = self.serving_adapter()
        return write_peft_adapter(Path(directory), spec, tensors, base_model, merged)


def announced_profile(fleet: str, device_id: str, *, plan: bool = True, profile=None, state_dir=None,
                      reprofile: bool = False, emulate=None, threads: int | None = None,
                      uplink_mbps: float | None = None) -> tuple[DeviceProfile | None, DeviceClock]:
    """The profile a device sends in its hello (None: not planned) and its clock.

    ``profile`` (a DeviceProfile or a YAML file) is taken as it is; otherwise the device
    measures itself, cached in ``state_dir`` (``edgetune.profiling.auto``). With ``emulate``
    (a profile or its file) it announces that class, capped by what it measured, and its
    clock stretches compute to the class's speed (``edgetune.clock.ThrottledClock``)."""
    from .clock import ThrottledClock
    from .profiling import load_profile

    if not plan:
        if profile is not None or emulate is not None:
            log.warning("%s: planning is off (--no-plan): the profile is not sent", device_id)
        return None, DeviceClock()
    if profile is not None:
        if emulate is not None:
            log.warning("%s: a given profile is announced as it is; emulate applies to measured ones", device_id)
        return (profile if isinstance(profile, DeviceProfile) else load_profile(profile)), DeviceClock()
    if isinstance(emulate, (str, Path)):
        emulate = load_profile(emulate)
    from .profiling.auto import default_state_dir, self_profile

    measured = self_profile(Path(state_dir) if state_dir else default_state_dir(fleet, device_id), device_id,
                            threads=threads, reprofile=reprofile, emulate=emulate, uplink_mbps=uplink_mbps)
    found = measured.profile
    log.info("%s: profile %s%s: %.1f GiB for training, %s GFLOP/s, bases %s", device_id, found.name,
             " (cached measurement)" if measured.cached else "", found.memory_bytes / 2**30,
             ", ".join(f"{k} {v:g}" for k, v in found.gflops.items()), ", ".join(("float32", *found.quantization)))
    if measured.emulated:
        slow = measured.slowdown("float32")
        log.info("%s: emulating %s on this machine: memory capped at %.1f GiB, compute stretched %.1f×",
                 device_id, emulate.name, found.memory_bytes / 2**30, slow)
        return found, ThrottledClock(measured.slowdown, threads or _torch_threads())
    return found, DeviceClock()


def _torch_threads() -> int:
    """The threads training will use when none were given (torch's default, else 1)."""
    try:
        import torch
    except ImportError:
        return 1
    return torch.get_num_threads()


def client_id(fleet: str, device_id: str, signing_key: Path | None = None, suffix: str = "") -> str:
    """The MQTT client id of a device's connection: stable (a persistent session survives
    restarts) and, with a signing key, not guessable by other clients (see ``Signer.client_tag``)."""
    tag = ""
    if signing_key is not None:
        from .wire.signing import Signer

        tag = "-" + Signer.load(device_id, signing_key).client_tag
    return f"edgetune-{fleet}-{device_id}{suffix}{tag}"
