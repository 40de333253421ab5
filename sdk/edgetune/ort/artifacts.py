"""The ONNX Runtime training artifacts of one base model and adapter layout, and their manifest.

``edgetune build-ort`` (where PyTorch is installed) writes a folder::

    training_model.onnx   forward + loss + gradient graph; only the LoRA factors are trainable
    eval_model.onnx       forward + loss, for held-out perplexity
    optimizer_model.onnx  AdamW (PyTorch's rule) with gradient clipping, for those who drive ORT's
                          own Optimizer (edgetune's trainer steps in numpy: trainers/adamw.py)
    checkpoint            every parameter: the frozen base and the initial LoRA factors
    tokenizer.json        the base's tokenizer for the ``tokenizers`` library (absent for the
                          byte tokenizer of the tiny test models)
    edgetune-ort.json     this manifest

A device reads it with nothing but the standard library: which model (architecture
fingerprint and a hash of the frozen weights), which adapter layout (rank, alpha, modules), how
the checkpoint's parameter names map to the fleet's ``{module}.lora_A``/``lora_B`` names and in
which order ``get_contiguous_parameters`` lays them out, each file's SHA-256, and the versions
that built it. :func:`load_manifest` refuses a folder whose files do not match it, and
:func:`check_kind` a round of another adapter kind (each kind's ONNX Runtime trainer checks the
rest of its layout), each with a message that says what to rebuild.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..adapters.registry import adapter_kind, spec_from_dict
from ..wire import ModelManifest

__all__ = [
    "ArtifactError",
    "ArtifactManifest",
    "AdapterLayout",
    "MANIFEST_FILE",
    "FORMAT",
    "OptimizerSettings",
    "ParamEntry",
    "check_kind",
    "file_digest",
    "load_manifest",
    "weights_digest",
]

MANIFEST_FILE = "edgetune-ort.json"
FORMAT = 1
TRAINING_MODEL = "training_model.onnx"
EVAL_MODEL = "eval_model.onnx"
OPTIMIZER_MODEL = "optimizer_model.onnx"
CHECKPOINT = "checkpoint"
TOKENIZER = "tokenizer.json"
#: the inputs every training and eval graph takes, in order
INPUTS = ("input_ids", "attention_mask", "position_ids", "loss_scale", "prox_scale")


class ArtifactError(ValueError):
    """The artifacts cannot be used for this fleet or are damaged; the message says why and
    what to rebuild."""


@dataclass(frozen=True)
class ParamEntry:
    """One trainable tensor: the fleet's name, the checkpoint's name, its shape, and the
    checkpoint's name of its frozen FedProx anchor."""

    name: str
    ort_name: str
    shape: tuple[int, ...]
    anchor: str


@dataclass(frozen=True)
class AdapterLayout:
    """What the graphs train: LoRA factors of ``rank`` on ``modules``, scaled alpha / rank;
    or (``kind="prompt"``) a soft prompt of ``num_virtual_tokens``, whose layout has no rank
    or modules but records the checkpoint name of the input ``embedding`` matrix (the
    prompt's initialization reads rows of it)."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    modules: tuple[str, ...]
    kind: str = "lora"
    num_virtual_tokens: int = 0
    embedding: str = ""

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0

    def spec(self):
        """The adapter spec these graphs train (each kind takes the fields that are its own)."""
        return spec_from_dict(asdict(self))

    def describe(self) -> str:
        spec = self.spec()
        return adapter_kind(spec).describe(spec)


@dataclass(frozen=True)
class OptimizerSettings:
    """What the optimizer graph bakes in (ORT takes only the learning rate at run time)."""

    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


@dataclass(frozen=True)
class ArtifactManifest:
    model: ModelManifest
    #: SHA-256 of the frozen base as stored in the checkpoint (see :func:`weights_digest`)
    model_hash: str
    adapter: AdapterLayout
    #: trainable tensors in ``get_contiguous_parameters(trainable_only=True)`` order
    parameters: tuple[ParamEntry, ...]
    #: module -> (checkpoint name of its frozen weight, stored as (in, out) — GPT-2's Conv1D)
    base_weights: dict[str, tuple[str, bool]]
    optimizer: OptimizerSettings
    #: "tokenizers" (tokenizer.json) or "bytes" (the tiny models' UTF-8 byte tokenizer)
    tokenizer: str
    eos_token_id: int | None
    #: file name -> SHA-256 of every file of the folder but this manifest
    files: dict[str, str]
    #: package versions, opset and IR version the artifacts were built with
    versions: dict[str, str] = field(default_factory=dict)
    format: int = FORMAT

    @property
    def trainable_size(self) -> int:
        return sum(math.prod(p.shape) for p in self.parameters)

    def to_json(self) -> dict:
        return {"kind": "edgetune-ort-artifacts", **asdict(self)}

    @classmethod
    def from_json(cls, data: Mapping) -> ArtifactManifest:
        if not isinstance(data, Mapping):
            raise ArtifactError(f"malformed artifact manifest: a JSON object was expected, not {type(data).__name__}")
        try:
            if data.get("kind") != "edgetune-ort-artifacts":
                raise ArtifactError("not an edgetune ONNX Runtime artifact manifest")
            if data.get("format") != FORMAT:
                raise ArtifactError(f"artifact format {data.get('format')} is not the {FORMAT} this SDK reads: "
                                    "rebuild them with this version's `edgetune build-ort`")
            model = dict(data["model"])
            model["modules"] = {k: tuple(v) for k, v in model["modules"].items()}
            adapter = dict(data["adapter"])
            return cls(
                model=ModelManifest(**model),
                model_hash=str(data["model_hash"]),
                adapter=AdapterLayout(int(adapter["rank"]), float(adapter["alpha"]),
                                      tuple(adapter["target_modules"]), tuple(adapter["modules"]),
                                      str(adapter.get("kind", "lora")), int(adapter.get("num_virtual_tokens", 0)),
                                      str(adapter.get("embedding", ""))),
                parameters=tuple(ParamEntry(p["name"], p["ort_name"], tuple(int(s) for s in p["shape"]), p["anchor"])
                                 for p in data["parameters"]),
                base_weights={str(k): (str(v[0]), bool(v[1])) for k, v in data["base_weights"].items()},
                optimizer=OptimizerSettings(**{**data["optimizer"], "betas": tuple(data["optimizer"]["betas"])}),
                tokenizer=str(data["tokenizer"]),
                eos_token_id=data.get("eos_token_id"),
                files={str(k): str(v) for k, v in data["files"].items()},
                versions={str(k): str(v) for k, v in data.get("versions", {}).items()},
                format=int(data["format"]),
            )
        except ArtifactError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ArtifactError(f"malformed artifact manifest: {type(exc).__name__}: {exc}") from exc


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def weights_digest(tensors: Iterable[tuple[str, object]]) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of each frozen tensor, in name order: the
    identity of the base's weights, independent of file layout."""
    digest = hashlib.sha256()
    for name, array in sorted(tensors, key=lambda item: item[0]):
        digest.update(json.dumps([name, str(array.dtype), list(array.shape)]).encode())
        digest.update(memoryview(array.tobytes()))
    return digest.hexdigest()


def load_manifest(folder: Path, *, verify_files: bool = True) -> ArtifactManifest:
    """The manifest of ``folder``, after checking that every file it lists is there with its
    recorded SHA-256 (``verify_files=False`` skips the hashing, for a folder checked before)."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{folder} holds no ONNX Runtime artifacts ({MANIFEST_FILE} is missing): "
                            "build them with `edgetune build-ort --out DIR` where PyTorch is installed") from None
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read {path}: {exc}") from exc
    manifest = ArtifactManifest.from_json(data)
    required = {TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL, CHECKPOINT}
    if manifest.tokenizer == "tokenizers":
        required.add(TOKENIZER)
    missing = sorted(required - set(manifest.files))
    if missing:
        raise ArtifactError(f"artifact manifest in {folder} lists no {', '.join(missing)}: rebuild the artifacts")
    if verify_files:
        for name, expected in sorted(manifest.files.items()):
            file = folder / name
            if not file.is_file():
                raise ArtifactError(f"artifact file {file} is missing: copy the whole folder, or rebuild it")
            actual = file_digest(file)
            if actual != expected:
                raise ArtifactError(f"artifact file {file} does not match its manifest (sha256 {actual[:12]}… "
                                    f"instead of {expected[:12]}…): it was modified or comes from another build")
    return manifest


def check_kind(manifest: ArtifactManifest, spec, rebuild: str) -> None:
    """Refuse a round of another adapter kind than the graphs train (``rebuild``: the
    ``edgetune build-ort`` options that would make the right ones)."""
    built = manifest.adapter
    if built.kind != spec.kind:
        raise ArtifactError(f"the round trains {adapter_kind(spec).describe(spec)} but the artifacts train "
                            f"{built.describe()}: rebuild with `edgetune build-ort {rebuild}`")
