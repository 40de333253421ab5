"""What a device with a real model computes for each task: the worker behind ``Device``
(``edgetune.protocol`` carries its answers), training with PyTorch or ONNX Runtime through its
``Workload``.

A train round starts the trainer from exactly the global model at the device's planned rank
(``AdapterKind.training_start``), evaluates it on held-out blocks, trains the plan's steps
(checking the round's deadline and the device's memory budget at every step), and answers with
the delta. When memory runs out it backs off (smaller batch, checkpointing, lower rank, stronger
quantization) and says so to the aggregator. Calibration scores weight matrices; initialization
proposes the starting adapter from the base.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .adapters.lora import targets
from .adapters.registry import adapter_kind
from .backoff import MemoryBudgetExceeded, is_out_of_memory, next_fallback, resident_bytes
from .clock import DeviceClock
from .work import RoundEnv, Worker
from .trainers.result import TrainResult
from .wire import (
    AdapterInit,
    Capabilities,
    DevicePlan,
    DeviceProfile,
    EvalMetrics,
    EvalReport,
    GlobalAdapter,
    ImportanceReport,
    ModelManifest,
    Progress,
    RoundTask,
    TaskKind,
    TrainMetrics,
    Update,
)
from .workload import Workload

log = logging.getLogger("edgetune.device")

__all__ = ["WorkloadWorker", "hash_seed"]


class WorkloadWorker(Worker):
    def __init__(self, workload: Workload, device_id: str, clock: DeviceClock, profile: DeviceProfile | None = None,
                 max_eval_blocks: int = 16):
        self.workload = workload
        self.device_id = device_id
        self.clock = clock
        #: its memory_bytes is the budget training stays within (exceeding it backs off)
        self.profile = profile
        #: cap on held-out blocks evaluated per round (bounds evaluation time on slow devices)
        self.max_eval_blocks = max_eval_blocks
        #: resident bytes of this device now, checked against its profile's memory each step
        #: (the fleet simulator, with several devices in one process, counts each one's own)
        self.memory_gauge: Callable[[], int] = resident_bytes
        #: rounds (on the protocol's thread) and personalization (on the application's) share the trainer
        self.lock = threading.Lock()
        #: the plan this device last trained with (after any back-off): personalization's too
        self.last_plan: DevicePlan | None = None
        self._plan_logged: tuple | None = None
        self._last_task: RoundTask | None = None  # (the settings a score outside a round uses)

    @property
    def manifest(self) -> ModelManifest:
        return self.workload.manifest

    @property
    def num_samples(self) -> int:
        return self.workload.num_samples

    def capabilities(self, max_packet: int) -> Capabilities:
        return Capabilities(backends=(self.workload.backend,), adapters=self.workload.adapters,
                            max_packet=max_packet, max_rank=self.workload.max_rank)

    @contextmanager
    def computing(self, task: RoundTask) -> Iterator[None]:
        with self.lock, self.clock.computing(self._compute_dtype(task)):
            self._last_task = task
            yield

    def _compute_dtype(self, task: RoundTask) -> str:
        """The dtype this round's matmuls run in (what an emulated or simulated clock scales)."""
        from .planning.costmodel import compute_dtype

        plan = task.plans.get(self.device_id)
        return compute_dtype(plan.quantization) if plan else "float32"

    def _eval_blocks(self, task: RoundTask) -> int:
        """Held-out blocks to score this round (0 in a train round: none, the fleet is scored
        elsewhere; an evaluation round always scores at least one)."""
        blocks = min(self.max_eval_blocks, task.train.eval_blocks)
        return blocks if task.kind is TaskKind.TRAIN else max(1, blocks)

    def _log_plan(self, task: RoundTask, plan: DevicePlan) -> None:
        """The plan, once per change: rank, base precision, batch, steps and layout size."""
        key = (task.run_id, plan, task.adapter)
        if key == self._plan_logged:
            return
        self._plan_logged = key
        source = "the planner's" if self.device_id in task.plans else "the fleet's uniform"
        layout = adapter_kind(task.adapter).plan_note(task.adapter, self.workload.manifest, plan.rank)
        log.info("%s: %s plan: rank %d, %s base, batch %d%s, %d steps%s", self.device_id, source, plan.rank,
                 plan.quantization, plan.batch_size, ", checkpointing" if plan.gradient_checkpointing else "",
                 plan.local_steps, layout)

    def plan(self, task: RoundTask) -> DevicePlan:
        """The planner's choice for this device, or the fleet's defaults."""
        plan = task.plans.get(self.device_id)
        if plan is not None:
            return plan
        rank = adapter_kind(task.adapter).rank(task.adapter) or 1  # (a kind without a rank: 1, unused)
        if self.workload.max_rank:  # ONNX Runtime artifacts train up to their own rank
            rank = min(rank, self.workload.max_rank)
        return DevicePlan(rank, "float32", task.train.batch_size, task.train.local_steps)

    def calibrate(self, task: RoundTask, env: RoundEnv) -> ImportanceReport:
        """Score the candidate weight matrices (``task.adapter.target_modules``) on local data
        and report the scores; the aggregator picks the adapter layout from every device's."""
        me = self.device_id
        plan = self.plan(task)
        # weight gradients need a float base: a device planned on int8/nf4 scores in bfloat16
        supported = self.profile.quantization if self.profile else ()
        if plan.quantization in ("float32", "bfloat16"):
            quantization = plan.quantization
        else:
            quantization = "bfloat16" if "bfloat16" in supported else "float32"
        self.clock.dtype = "bfloat16" if quantization == "bfloat16" else "float32"
        modules = targets(task.adapter, self.workload.manifest.modules)
        settings = dataclasses.replace(task.train, batch_size=min(plan.batch_size, task.importance.batch_size))
        result = self.workload.importance(modules, settings, task.importance, quantization,
                                          seed=task.train.seed + hash_seed(me))
        self.clock.checkpoint()
        log.info("%s: scored %d weight matrices on %d tokens in %.1f s", me, len(result.scores), result.tokens,
                 result.seconds)
        return ImportanceReport(me, task.round, self.workload.num_samples, result.scores, result.tokens, result.seconds)

    def initialize(self, task: RoundTask, env: RoundEnv) -> AdapterInit:
        """Compute the fleet's starting adapter from this device's base (a soft prompt's token
        embeddings) and report it; the aggregator publishes it as global v0."""
        me = self.device_id
        kind = adapter_kind(task.adapter)
        if not kind.initialized_on_devices:
            raise ValueError(f"an initialization round for a {task.adapter.kind} adapter")
        tensors = self.workload.initial_adapter(task.adapter, seed=task.train.seed)
        self.clock.checkpoint()
        log.info("%s: proposes the starting adapter (%s)", me, kind.describe(task.adapter))
        return AdapterInit(me, task.round, tensors)

    def train(self, task: RoundTask, env: RoundEnv) -> Update | None:
        """Train this round, backing off (smaller batch, checkpointing, lower rank, stronger
        quantization) when memory runs out; each back-off is reported to the aggregator."""
        me = self.device_id
        plan, grad_accum = self.plan(task), task.train.grad_accum
        self._log_plan(task, plan)
        torch_backend = self.workload.backend == "torch"  # the others can neither quantize nor checkpoint
        supported = self.profile.quantization if self.profile and torch_backend else ()
        while True:
            try:
                return self._train_with(task, env, plan, grad_accum)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                self.clock.checkpoint()  # (the failed attempt took the device's time too)
                fallback = next_fallback(plan, grad_accum, supported, checkpointing=torch_backend)
                gc.collect()
                if fallback is None:
                    env.report_error("out_of_memory", f"nothing smaller left to try: {exc}")
                    return None
                plan, grad_accum, change = fallback
                log.warning("%s: round %d out of memory (%s); backing off: %s", me, task.round, exc, change)
                env.report_error("oom_backoff", f"{change} after {type(exc).__name__}: {exc}"[:500])

    def _start_model(self, task: RoundTask, adapter: GlobalAdapter, rank: int, quantization: str, checkpointing: bool):
        """A trainer holding the global model with its leading ``rank`` components trainable:
        the components beyond ``rank`` and the global's frozen delta are applied as a frozen
        merged delta, so training starts from exactly the global model at any rank. (A soft
        prompt is trained whole.)"""
        spec = task.adapter
        begin = adapter_kind(spec).training_start(spec, adapter.tensors, adapter.merged, rank)
        trainer = self.workload.trainer(begin.spec, quantization, checkpointing)
        trainer.set_adapter(begin.tensors)
        trainer.set_merged(begin.merged)
        return trainer, begin.tensors

    def _train_with(self, task: RoundTask, env: RoundEnv, plan: DevicePlan, grad_accum: int) -> Update:
        from .planning.costmodel import compute_dtype

        me, adapter = self.device_id, env.global_adapter
        self.last_plan = plan
        self.clock.dtype = compute_dtype(plan.quantization)
        trainer, start = self._start_model(task, adapter, plan.rank, plan.quantization, plan.gradient_checkpointing)
        blocks = self._eval_blocks(task)  # (0: the fleet is evaluated elsewhere; no scores)
        heldout = self.workload.heldout_blocks(task.train.seq_len)[:blocks]
        robust = self.workload.robustness_blocks(task.train.seq_len, blocks) if blocks else heldout[:0]

        def score(data):
            return trainer.perplexity(data) if len(data) else None

        global_ppl = score(heldout)
        global_robust = score(robust)
        local_robust = global_robust
        serving = self._serving_score(trainer, task, env, adapter, plan.rank, heldout, start)
        budget = self.profile.memory_bytes if self.profile else None

        self.clock.checkpoint()  # (loading the model and evaluating the global adapter)
        env.hold()  # (the machine's own job first: policy.py)
        env.check_deadline(task, 0.0)  # (a task that waited while the device was busy may be over)

        def on_step(step: int, total: int, loss: float) -> None:
            resident = self.memory_gauge() if budget is not None else 0
            if budget is not None and resident > budget:
                raise MemoryBudgetExceeded(f"resident memory {resident / 2**20:,.0f} MiB is over "
                                           f"the device's budget of {budget / 2**20:,.0f} MiB")
            step_s = self.clock.checkpoint()
            if step < total:
                env.hold()
                env.check_deadline(task, step_s)
            env.progress(Progress(me, task.round, step, total, float(loss)))

        settings = dataclasses.replace(task.train, batch_size=plan.batch_size, local_steps=plan.local_steps,
                                       grad_accum=grad_accum)
        batches = self.workload.batches(settings, seed=task.train.seed + hash_seed(me))
        if settings.algorithm == "fedsgd":
            # one gradient at the global adapter; the server steps with its own learning rate.
            # Weighted by the blocks it averages, the fleet's mean is the gradient of the union.
            micro = [next(batches) for _ in range(settings.grad_accum)]
            grads, loss, tokens = trainer.gradient(micro)
            delta = {name: -g for name, g in grads.items()}
            weight = sum(len(b) for b in micro)
            result = TrainResult(loss, loss, tokens, 0.0, 1)
            local_ppl = global_ppl
        else:
            if settings.local_epochs:
                per_step = settings.batch_size * settings.grad_accum
                steps = settings.local_epochs * -(-self.workload.train_blocks(settings.seq_len) // per_step)
                if me in task.plans and steps > plan.local_steps:
                    log.info("%s: %d epochs are %d steps; the plan allows %d", me, settings.local_epochs, steps,
                             plan.local_steps)
                    steps = plan.local_steps
                settings = dataclasses.replace(settings, local_steps=max(1, steps))
            result = trainer.train(batches, settings, on_step)
            local_ppl = score(heldout)
            local_robust = score(robust)
            trained = trainer.get_adapter()
            delta = {name: trained[name] - start[name] for name in trained}
            weight = self.workload.num_samples
        self.clock.checkpoint()
        sent, received = env.traffic()
        metrics = TrainMetrics(result.mean_loss, result.tokens, result.seconds, local_ppl, global_ppl, sent, received,
                               global_robust, local_robust, *serving)
        scores = f", held-out ppl {global_ppl:.2f} -> {local_ppl:.2f}" if global_ppl is not None else ""
        log.info("%s: round %d (rank %d, %s, batch %d, %d steps) loss %.3f%s", me, task.round,
                 plan.rank, plan.quantization, plan.batch_size, result.steps, result.mean_loss, scores)
        return Update(me, task.round, adapter.version, weight, delta, metrics, task.run_id)

    def evaluate(self, task: RoundTask, env: RoundEnv) -> EvalReport:
        me, adapter = self.device_id, env.global_adapter
        plan = self.plan(task)  # evaluate at full rank, on the base precision this device can afford
        rank = self._full_rank(task, plan)
        trainer, _ = self._start_model(task, adapter, rank, plan.quantization, plan.gradient_checkpointing)
        blocks = self._eval_blocks(task)
        heldout = self.workload.heldout_blocks(task.train.seq_len)[:blocks]
        robust = self.workload.robustness_blocks(task.train.seq_len, blocks)
        ppl = trainer.perplexity(heldout)
        robust_ppl = trainer.perplexity(robust) if len(robust) else None
        serving = self._serving_score(trainer, task, env, adapter, rank, heldout, None)
        self.clock.checkpoint()
        log.info("%s: global adapter v%d held-out ppl %.2f", me, adapter.version, ppl)
        return EvalReport(me, task.round, adapter.version, self.workload.num_samples,
                          EvalMetrics(ppl, int(heldout.size), robust_ppl, *serving))

    def _full_rank(self, task: RoundTask, plan: DevicePlan) -> int:
        """The rank a global adapter is scored at: the fleet's (ONNX Runtime artifacts hold their
        own, the rest rides frozen)."""
        rank = adapter_kind(task.adapter).rank(task.adapter) or plan.rank
        return min(rank, self.workload.max_rank) if self.workload.max_rank else rank

    def score(self, adapters: list[GlobalAdapter]) -> list[float | None]:
        """Each adapter's perplexity on the held-out blocks an evaluation round scores, at full
        rank on the base precision this device trains with (a canary's report)."""
        task = self._last_task
        if task is None:
            return [None] * len(adapters)
        scores: list[float | None] = []
        with self.lock:
            heldout = self.workload.heldout_blocks(task.train.seq_len)[:max(1, self.max_eval_blocks)]
            plan = self.last_plan or self.plan(task)
            rank = self._full_rank(task, plan)
            for adapter in adapters:
                if adapter.adapter != task.adapter or not len(heldout):
                    scores.append(None)
                    continue
                trainer, _ = self._start_model(task, adapter, rank, plan.quantization, plan.gradient_checkpointing)
                scores.append(trainer.perplexity(heldout))
        return scores

    def _serving_score(self, trainer, task: RoundTask, env: RoundEnv, adapter: GlobalAdapter, rank: int, heldout,
                       restore) -> tuple[int | None, float | None]:
        """``(version, perplexity)`` of the version this device serves on the same held-out
        blocks as the round's global (the validation gate compares the two, device by device),
        or ``(None, None)`` where it serves that global, none, or another layout. The trainer
        is left holding ``restore`` (the round's start) again, if given."""
        served = env.serving
        if served is None or served.version == adapter.version or served.adapter != task.adapter or not len(heldout):
            return None, None
        begin = adapter_kind(task.adapter).training_start(task.adapter, served.tensors, served.merged, rank)
        trainer.set_adapter(begin.tensors)
        trainer.set_merged(begin.merged)
        ppl = trainer.perplexity(heldout)
        if restore is not None:
            start = adapter_kind(task.adapter).training_start(task.adapter, adapter.tensors, adapter.merged, rank)
            trainer.set_adapter(restore)
            trainer.set_merged(start.merged)
        return served.version, ppl


def hash_seed(text: str) -> int:
    """A stable small integer from a name (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
