"""``edgetune build-ort``: export a base model with LoRA injected (or a soft prompt put before
its inputs) and generate ONNX Runtime training artifacts in which only the adapter is trainable. Needs torch, transformers,
PEFT, onnx and onnxruntime-training; runs where those are (a server), once per model and layout.

The exported graph is the PEFT model the torch trainer trains (same modules, same scale), in a
wrapper that returns the loss: ``data_loss · loss_scale + prox_scale/2 · Σ‖θ − θ_anchor‖²``.
``loss_scale`` lets a device average gradients over micro-batches (ORT sums them), and the
anchors (frozen copies of the factors, set at the start of a round) give FedProx. A second
output, ``data_loss``, is the plain mean next-token loss, for reporting and perplexity.

A soft prompt (``--prompt-tokens N``) is the PEFT prompt-tuning model the torch trainer trains,
exported the same way: the wrapper puts the N prompt vectors before the token embeddings and
runs the base on N + T positions (positions 0..N+T−1, a causal mask over all of them, as PEFT
does), and the loss is over the block's T − 1 predicted tokens, as the torch trainer's.

What ONNX Runtime training 1.19.2 needs of the export (measured; docs/ort.md): the TorchScript
exporter (``dynamo=False``), opset 15, no constant folding (it renames and transposes weights),
``TrainingMode.TRAINING``, eager attention, and explicit attention mask and position ids. The
wrapper builds the 4-D additive causal mask itself, because transformers' own mask builder
(``torch.vmap``) cannot be traced. onnx ≥ 1.23 stamps IR 14, which ORT 1.19 refuses: every
graph is re-stamped IR 10 (it uses nothing newer).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

from .. import __version__
from ..atomic import replace_dir
from ..adapters.registry import adapter_kind
from ..wire import AdapterSpec, LoraSpec, PromptSpec
from .artifacts import (
    CHECKPOINT,
    EVAL_MODEL,
    INPUTS,
    MANIFEST_FILE,
    OPTIMIZER_MODEL,
    TOKENIZER,
    TRAINING_MODEL,
    AdapterLayout,
    ArtifactManifest,
    OptimizerSettings,
    ParamEntry,
    file_digest,
    weights_digest,
)
from .optim import IR_VERSION, OPSET, build_optimizer_model, cap_ir_version
from .runtime import training

log = logging.getLogger(__name__)

__all__ = ["build_artifacts"]

_ANCHORS = "anchors"
#: ModelProtos above this are handed to ORT's generator as a file (protobuf's 2 GB limit)
_PROTO_LIMIT = 1 << 30


def build_artifacts(
    model_ref: str | None,
    out: Path,
    rank: int = 8,
    alpha: float = 16.0,
    targets: tuple[str, ...] | None = None,
    optimizer: OptimizerSettings = OptimizerSettings(),
    seed: int = 0,
    force: bool = False,
    prompt_tokens: int | None = None,
    spec: AdapterSpec | None = None,
) -> ArtifactManifest:
    """Build the artifacts for ``model_ref`` (as for ``load_model``) into ``out``.

    ``spec`` is the adapter to train (of a kind in ``_GRAPHS``); without it, the command line's
    options make one: ``prompt_tokens`` N a soft prompt of N virtual tokens, otherwise LoRA of
    ``rank``, ``alpha`` and ``targets``.

    ``rank`` and ``alpha`` must be the fleet's (the aggregator's ``--rank``/``--alpha``; both
    default alike): a device trains any rank up to ``rank`` at scale alpha / rank.
    ``targets`` defaults to the architecture's default (q_proj, v_proj; c_attn on GPT-2). The
    folder is built beside ``out`` and renamed into place, so ``out`` is never half-written.
    """
    import torch

    from ..models import default_targets, load_model

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder: choose another --out")
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} is not empty: pass --force to replace it")
    started = time.perf_counter()
    loaded = load_model(model_ref)
    if spec is None:  # (the command line's options)
        spec = (PromptSpec(num_virtual_tokens=prompt_tokens) if prompt_tokens is not None else
                LoraSpec(rank=rank, alpha=float(alpha), target_modules=tuple(targets or default_targets(loaded))))
    kind = adapter_kind(spec)
    if kind.name not in _GRAPHS:
        raise ValueError(f"no ONNX Runtime graph is built for {kind.name} adapters (only {', '.join(_GRAPHS)})")
    graph, layout = _GRAPHS[kind.name](loaded, spec, seed)
    described = kind.describe(spec, loaded.manifest)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        exported = _export(graph, tmp / "exported.onnx")
        parameters, base_weights, initializers = _generate(exported, graph, tmp, optimizer)
        if kind.initialized_on_devices:  # (its start reads rows of the input embedding matrix)
            embedding = next((n for n in graph.embedding_names if n in initializers), None)
            if embedding is None:
                raise RuntimeError(f"the exported graph lost the input embedding matrix's name: cannot initialize "
                                   f"{kind.name} adapters")
            layout = dataclasses.replace(layout, embedding=embedding)
        (tmp / "exported.onnx").unlink()
        tokenizer = _save_tokenizer(loaded.tokenizer, tmp)
        manifest = ArtifactManifest(
            model=loaded.manifest,
            model_hash=_checkpoint_hash(tmp / CHECKPOINT),
            adapter=layout,
            parameters=parameters,
            base_weights=base_weights,
            optimizer=optimizer,
            tokenizer=tokenizer,
            eos_token_id=getattr(loaded.tokenizer, "eos_token_id", None),
            files={f.name: file_digest(f) for f in sorted(tmp.iterdir()) if f.is_file()},
            versions=_versions(torch),
        )
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp made it private
        replace_dir(tmp, out)  # a non-empty out only with force (checked above)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("ONNX Runtime artifacts for %s (%s, %d trainable parameters) in %s, %.1f s",
             loaded.name, described, manifest.trainable_size, out, time.perf_counter() - started)
    return manifest


class _TrainingGraph:
    """Builds the ``torch.nn.Module`` that is exported (its class is defined inside, so this
    module imports without torch), and the names the exporter gives its parameters."""

    def __init__(self, trainer: Any):
        import torch

        peft_model = trainer.model
        named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
        self.names = {}  # torch parameter name -> fleet name
        for name, _ in named:
            module, factor = _fleet_name(name)
            self.names[name] = f"{module}.{factor}"

        class Graph(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.m = peft_model
                # frozen copies of the factors: FedProx's anchor, set by the device each round
                self.anchors = torch.nn.ParameterList(
                    [torch.nn.Parameter(p.detach().clone(), requires_grad=False) for _, p in named]
                )
                self._trainable = [p for _, p in named]

            def forward(self, input_ids, attention_mask, position_ids, loss_scale, prox_scale):
                length = input_ids.shape[1]
                causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
                allowed = causal[None, None, :, :] & attention_mask[:, None, None, :].bool()
                mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(
                    ~allowed, torch.finfo(torch.float32).min
                )
                data_loss = self.m(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                                   labels=input_ids, use_cache=False).loss
                drift = sum(((p - a) ** 2).sum() for p, a in zip(self._trainable, self.anchors, strict=True))
                return data_loss * loss_scale + 0.5 * prox_scale * drift, data_loss

        self.module = Graph().train()
        # each linear layer's frozen weight, for a device to add a merged delta to
        from transformers.pytorch_utils import Conv1D

        wrapped = peft_model.base_model.model
        self.base_weights = {}
        for module_name in trainer.loaded.manifest.modules:
            layer = wrapped.get_submodule(module_name)
            base = getattr(layer, "base_layer", layer)
            suffix = "base_layer.weight" if base is not layer else "weight"
            self.base_weights[module_name] = (f"m.base_model.model.{module_name}.{suffix}", isinstance(base, Conv1D))
        # the ORT name of each trainable parameter and its anchor, as the exporter will call them
        self.ort_names = {f"m.{name}": self.names[name] for name, _ in named}
        self.anchor_names = {self.names[name]: f"{_ANCHORS}.{i}" for i, (name, _) in enumerate(named)}


class _PromptGraph:
    """As :class:`_TrainingGraph`, for a soft prompt (``TorchPromptTrainer``'s PEFT model)."""

    def __init__(self, trainer: Any):
        import torch

        from ..adapters.prompt import PROMPT

        peft_model = trainer.model
        n = trainer.spec.num_virtual_tokens
        prompt_name = "prompt_encoder.default.embedding.weight"
        prompt = peft_model.get_parameter(prompt_name)
        self.names = {prompt_name: PROMPT}

        class Graph(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.m = peft_model
                self.anchors = torch.nn.ParameterList(
                    [torch.nn.Parameter(prompt.detach().clone(), requires_grad=False)])

            def forward(self, input_ids, attention_mask, position_ids, loss_scale, prox_scale):
                base = self.m.base_model  # the plain transformers model
                tokens = base.get_input_embeddings()(input_ids)  # (B, T, H)
                batch_ones = torch.ones_like(input_ids[:, :1])  # (B, 1): dynamic batch
                virtual = self.m.prompt_encoder.default.embedding.weight  # (N, H)
                embeds = torch.cat([virtual.unsqueeze(0) * batch_ones.unsqueeze(-1).to(virtual.dtype), tokens], 1)
                mask = torch.cat([batch_ones.expand(-1, n), attention_mask], 1)  # (B, N+T)
                length = embeds.shape[1]
                causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
                allowed = causal[None, None, :, :] & mask[:, None, None, :].bool()
                additive = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(
                    ~allowed, torch.finfo(torch.float32).min)
                prefix = torch.arange(n, device=input_ids.device).unsqueeze(0) * batch_ones  # (B, N)
                positions = torch.cat([prefix, position_ids + n], 1)
                logits = base(inputs_embeds=embeds, attention_mask=additive, position_ids=positions,
                              use_cache=False).logits[:, n:-1]  # the block's predictions of tokens 1..T-1
                data_loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1))
                drift = ((virtual - self.anchors[0]) ** 2).sum()
                return data_loss * loss_scale + 0.5 * prox_scale * drift, data_loss

        self.module = Graph().train()
        self.base_weights: dict[str, tuple[str, bool]] = {}  # a prompt has no merged delta
        self.ort_names = {f"m.{prompt_name}": PROMPT}
        self.anchor_names = {PROMPT: f"{_ANCHORS}.0"}
        # the embedding matrix may be tied to the output layer; the exporter keeps one name
        weight = peft_model.base_model.get_input_embeddings().weight
        self.embedding_names = [name for name, p in self.module.named_parameters(remove_duplicate=False)
                                if p is weight]


def _lora_graph(loaded: Any, spec: LoraSpec, seed: int) -> tuple[_TrainingGraph, AdapterLayout]:
    from ..adapters.lora import init_lora, targets
    from ..trainers.torch_lora import TorchLoraTrainer

    spec = dataclasses.replace(spec, dropout=0.0)  # (the graphs train without dropout)
    trainer = TorchLoraTrainer(loaded, spec)  # the very PEFT model the torch backend trains
    trainer.set_adapter(init_lora(spec, loaded.manifest.modules, seed))
    modules = targets(spec, loaded.manifest.modules)
    return _TrainingGraph(trainer), AdapterLayout(spec.rank, spec.alpha, spec.target_modules, tuple(modules))


def _prompt_graph(loaded: Any, spec: PromptSpec, seed: int) -> tuple[_PromptGraph, AdapterLayout]:
    from ..trainers.torch_prompt import TorchPromptTrainer

    trainer = TorchPromptTrainer(loaded, spec)  # the very PEFT model the torch backend trains
    return _PromptGraph(trainer), AdapterLayout(0, 0.0, (), (), "prompt", spec.num_virtual_tokens)


#: the exported training graph of each adapter kind that trains with ONNX Runtime: a function
#: of (loaded model, spec, seed) giving the graph and the layout the manifest records
_GRAPHS = {"lora": _lora_graph, "prompt": _prompt_graph}


def _fleet_name(torch_name: str) -> tuple[str, str]:
    """``base_model.model.{module}.lora_A.default.weight`` -> (module, "lora_A")."""
    parts = torch_name.split(".")
    i = next(i for i, part in enumerate(parts) if part in ("lora_A", "lora_B"))
    return ".".join(parts[2:i]), parts[i]


def _export(graph: Any, path: Path) -> Path:
    import torch

    ids = torch.zeros(2, 8, dtype=torch.int64)
    inputs = (ids, torch.ones_like(ids), torch.arange(8).expand(2, 8).contiguous(),
              torch.ones(1), torch.zeros(1))
    axes = {"batch": 0, "sequence": 1}
    dynamic = {name: {v: k for k, v in axes.items()} for name in INPUTS[:3]}
    # The exporter warns about what is intended here: padding_idx in training mode (the
    # embeddings are frozen), constant folding of Slice (folding is off on purpose), and the
    # tracer's Python-bool conversions (shapes are dynamic axes). Its errors still raise.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            graph.module, inputs, str(path), dynamo=False, opset_version=OPSET, do_constant_folding=False,
            training=torch.onnx.TrainingMode.TRAINING, input_names=list(INPUTS),
            output_names=["loss", "data_loss"], dynamic_axes=dynamic, export_params=True,
        )
    return path


def _generate(exported: Path, graph: Any, folder: Path, optimizer: OptimizerSettings
              ) -> tuple[tuple[ParamEntry, ...], dict[str, tuple[str, bool]], set[str]]:
    import onnx
    import onnxruntime

    training()
    from onnxruntime.training import artifacts

    onnxruntime.set_default_logger_severity(3)
    _quiet_gradient_builder(onnxruntime)
    model = onnx.load(str(exported))
    cap_ir_version(model)
    names = [init.name for init in model.graph.initializer]
    trainable = [n for n in names if n in graph.ort_names]
    if sorted(trainable) != sorted(graph.ort_names):
        missing = sorted(set(graph.ort_names) - set(trainable))[:3]
        raise RuntimeError(f"the exported graph lacks adapter parameters {missing}: the exporter renamed them")
    frozen = [n for n in names if n not in graph.ort_names]
    source: Any = model
    if model.ByteSize() > _PROTO_LIMIT:
        onnx.save(model, str(exported), save_as_external_data=True, location="exported.data")
        source = str(exported)
    artifacts.generate_artifacts(source, requires_grad=trainable, frozen_params=frozen, loss=None,
                                 optimizer=None, artifact_directory=str(folder))
    (folder / "exported.data").unlink(missing_ok=True)
    for name in (TRAINING_MODEL, EVAL_MODEL):
        graph_model = onnx.load(str(folder / name))
        if cap_ir_version(graph_model):
            onnx.save(graph_model, str(folder / name))
    order = _trainable_order(folder)
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    entries = tuple(ParamEntry(graph.ort_names[n], n, shapes[n], graph.anchor_names[graph.ort_names[n]])
                    for n in order)
    build_optimizer_model([(e.ort_name, e.shape) for e in entries], optimizer, folder / OPTIMIZER_MODEL)
    # weights the exporter merged away (tied to another) cannot take a delta: left out
    base_weights = {m: w for m, w in graph.base_weights.items() if w[0] in shapes}
    dropped = sorted(set(graph.base_weights) - set(base_weights))
    if dropped:
        log.warning("%d linear layers have no weight of their own in the graph (e.g. %s): no merged delta on them",
                    len(dropped), dropped[:3])
    return entries, base_weights, set(names)


def _quiet_gradient_builder(onnxruntime: Any) -> None:
    """ORT's gradient builder makes its own ``SessionOptions`` at the default log level and
    prints a hundred lines of graph-transformer INFO per build; give it quiet ones."""
    from onnxruntime.training.onnxblock import _training_graph_utils

    class _Quiet(onnxruntime.SessionOptions):
        def __init__(self) -> None:
            super().__init__()
            self.log_severity_level = 3

    _training_graph_utils.SessionOptions = _Quiet


def _trainable_order(folder: Path) -> list[str]:
    """Trainable parameter names in the order ``get_contiguous_parameters`` lays them out."""
    training()
    from onnxruntime.training.api import CheckpointState, Module

    from ..trainers.ort_lora import contiguous_order

    state = CheckpointState.load_checkpoint(str(folder / CHECKPOINT))
    module = Module(str(folder / TRAINING_MODEL), state, str(folder / EVAL_MODEL))
    return contiguous_order(state, module, [name for name, param in state.parameters if param.requires_grad])


def _checkpoint_hash(checkpoint: Path) -> str:
    training()
    from onnxruntime.training.api import CheckpointState

    state = CheckpointState.load_checkpoint(str(checkpoint))
    return weights_digest(
        (name, param.data) for name, param in state.parameters
        if not param.requires_grad and not name.startswith(f"{_ANCHORS}.")
    )


def _save_tokenizer(tokenizer: Any, folder: Path) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # a fast Hugging Face tokenizer: its state, post-processor included
        backend.save(str(folder / TOKENIZER))
        return "tokenizers"
    from ..models import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        return "bytes"
    raise ValueError(f"cannot save a {type(tokenizer).__name__} for torch-free devices: it needs a fast "
                     "(tokenizers-backed) Hugging Face tokenizer")


def _versions(torch: Any) -> dict[str, str]:
    versions = {"edgetune": __version__, "torch": torch.__version__, "opset": str(OPSET), "ir_version": str(IR_VERSION)}
    for package in ("transformers", "peft", "onnx", "onnxruntime-training"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions
