"""``edgetune export --merged``: a fleet's global adapter folded into its base, as a plain
Hugging Face model folder that any ``from_pretrained`` loads without PEFT or edgetune.
``edgetune export --onnx``: the same merged model as an ONNX text-generation graph (through
optimum), for devices that generate with onnxruntime alone (``edgetune.ort.generate``).

The adapter is read from the aggregator's state dir (``global/v000003.msgpack``, a wire
``GlobalAdapter``) directly, not through ``edgetune_aggregator``: devices and users install the
SDK alone. Every weight the adapter touches becomes
``W + merged_B @ merged_A + (alpha / rank) · lora_B @ lora_A``, computed in float32.

The folder is built next to ``--out`` and renamed into place, so ``--out`` is either absent,
the previous folder, or complete. torch and transformers are imported only when exporting.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .adapters.registry import adapter_kind
from .atomic import replace_dir
from .wire import FILE_VERSIONS, GlobalAdapter, WireError, decode_message

if TYPE_CHECKING:
    import torch

    from .models import LoadedModel

log = logging.getLogger(__name__)

__all__ = ["ExportError", "ExportResult", "export_merged", "export_onnx", "load_global", "merge_into", "weight_deltas"]

#: written into every export, so a folder says which fleet state and version it came from
RECORD_FILE = "edgetune-export.json"


class ExportError(RuntimeError):
    """The export cannot be made; the message says what to change."""


@dataclass(frozen=True)
class ExportResult:
    out: Path
    version: int
    #: modules whose weights changed
    merged: list[str]
    seconds: float


def load_global(state_dir: Path, version: int | None = None) -> GlobalAdapter:
    """Global adapter ``version`` of an aggregator state dir; by default the current one
    (``global_version`` in ``state.json``)."""
    state_dir = Path(state_dir)
    if version is None:
        try:
            version = int(json.loads((state_dir / "state.json").read_text())["global_version"])
        except FileNotFoundError:
            raise ExportError(f"{state_dir} has no state.json: pass the aggregator's --state-dir") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ExportError(f"cannot read the current version from {state_dir / 'state.json'} ({e}); "
                              "pass --version N") from None
    path = state_dir / "global" / f"v{version:06d}.msgpack"
    try:
        message = decode_message(path.read_bytes(), FILE_VERSIONS)
    except FileNotFoundError:
        available = sorted(p.stem for p in (state_dir / "global").glob("v*.msgpack"))
        raise ExportError(f"{path} does not exist; versions in {state_dir}: {', '.join(available) or 'none'}") from None
    except (OSError, WireError) as e:
        raise ExportError(f"cannot read {path}: {e}") from None
    if not isinstance(message, GlobalAdapter):
        raise ExportError(f"{path} holds a {type(message).__name__}, not a global adapter")
    kind = adapter_kind(message.adapter)
    if not kind.changes_weights:
        raise ExportError(f"{path} holds {kind.describe(message.adapter)}: it changes no weight of the base, so "
                          f"there is nothing to merge; load {state_dir / 'adapter'} with peft.PeftModel.from_pretrained "
                          "instead")
    return message


def weight_deltas(adapter: GlobalAdapter, modules: Mapping[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    """Module -> the dense (out, in) float32 change ``adapter`` makes to its weight, as its kind
    computes it (LoRA: ``merged_B @ merged_A + (alpha / rank) · lora_B @ lora_A``, exact).
    ``modules`` is the base's manifest, name -> (out_features, in_features); a misfit, or a kind
    that changes no weight, raises ``ValueError``."""
    spec = adapter.adapter
    deltas = adapter_kind(spec).weight_deltas(spec, adapter.tensors, adapter.merged, modules)
    if deltas is None:
        raise ValueError(f"{adapter_kind(spec).describe(spec)} changes no weight of the base")
    return deltas


def merge_into(model: torch.nn.Module, adapter: GlobalAdapter) -> list[str]:
    """Add ``adapter``'s change to ``model``'s weights in place; return the modules changed.

    ``model`` is a plain transformers model (not wrapped by PEFT). GPT-2's ``Conv1D`` stores
    its weight (in, out), so its delta is added transposed. The sum is formed in float32 and
    cast back to the weight's dtype. Raises ``ValueError`` if the adapter does not fit.
    """
    import torch
    from transformers.pytorch_utils import Conv1D

    from .models import manifest_of

    deltas = weight_deltas(adapter, manifest_of(model, "").modules)
    with torch.no_grad():
        for module_name, delta in deltas.items():
            module = model.get_submodule(module_name)
            update = torch.from_numpy(delta)  # (out, in)
            if isinstance(module, Conv1D):
                update = update.T  # (in, out)
            weight = module.weight
            weight.copy_((weight.float() + update.to(weight.device)).to(weight.dtype))
    return sorted(deltas)


def export_merged(
    state_dir: Path,
    out: Path,
    *,
    version: int | None = None,
    model_ref: str | None = None,
    force: bool = False,
) -> ExportResult:
    """Load the base ``model_ref`` names (``edgetune.models.load_model``), merge global adapter
    ``version`` of ``state_dir`` into it and save it to ``out`` with safetensors.

    The tokenizer is saved too when it can save itself; the tiny test models' ``ByteTokenizer``
    has no files, so their exports hold the model alone. ``out`` must be absent or empty
    unless ``force``, which replaces it.
    """
    started = time.perf_counter()
    out = _check_out(out, force)
    loaded, adapter, record = _merged_base(state_dir, version, model_ref)
    _write_folder(out, lambda tmp: _save_hf(loaded, tmp, record))
    result = ExportResult(out=out, version=adapter.version, merged=record["merged_modules"],
                          seconds=time.perf_counter() - started)
    log.info("exported global adapter v%d merged into %s (%d modules) to %s in %.1f s",
             result.version, loaded.name, len(result.merged), out, result.seconds)
    return result


def export_onnx(
    state_dir: Path,
    out: Path,
    *,
    version: int | None = None,
    model_ref: str | None = None,
    force: bool = False,
) -> ExportResult:
    """As :func:`export_merged`, then exported to ONNX by optimum (``optimum-onnx``) for text
    generation with a KV cache: ``model.onnx`` (inputs ``input_ids``, ``attention_mask``,
    ``position_ids`` and ``past_key_values.*``; outputs ``logits`` and ``present.*``), the
    config, and the tokenizer as ``tokenizer.json``, which ``edgetune.ort.generate`` runs with
    onnxruntime alone. Graphs are stamped IR ≤ 10 so onnxruntime(-training) 1.19 reads them.
    """
    started = time.perf_counter()
    out = _check_out(out, force)
    try:
        from optimum.exporters.onnx import main_export
    except ImportError as e:
        raise ExportError("the ONNX export needs optimum-onnx: pip install 'edgetune[onnx-export]'") from e
    loaded, adapter, record = _merged_base(state_dir, version, model_ref)

    def write(tmp: Path) -> None:
        merged = tmp / "merged-hf"
        _save_hf(loaded, merged, record)
        try:
            main_export(str(merged), output=str(tmp), task="text-generation-with-past", device="cpu",
                        library_name="transformers", local_files_only=True)
        except Exception as e:  # optimum raises many kinds; the message is what matters
            raise ExportError(f"optimum could not export {loaded.name} to ONNX: {type(e).__name__}: {e}") from e
        _finish_onnx(tmp, loaded.tokenizer)
        shutil.rmtree(merged)
        (tmp / RECORD_FILE).write_text(json.dumps({**record, "format": "onnx"}, indent=2, sort_keys=True) + "\n")

    _write_folder(out, write)
    result = ExportResult(out=out, version=adapter.version, merged=record["merged_modules"],
                          seconds=time.perf_counter() - started)
    log.info("exported global adapter v%d merged into %s as ONNX to %s in %.1f s",
             result.version, loaded.name, out, result.seconds)
    return result


def _check_out(out: Path, force: bool) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder: choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} is not empty: choose another --out, or pass --force to replace it")
    return out


def _merged_base(state_dir: Path, version: int | None, model_ref: str | None) -> tuple[LoadedModel, GlobalAdapter, dict]:
    """The base with the global adapter merged in, the adapter, and the export's record."""
    from .models import load_model

    adapter = load_global(state_dir, version)
    loaded = load_model(model_ref)
    if adapter.model_fingerprint != loaded.manifest.fingerprint:
        raise ExportError(
            f"global adapter v{adapter.version} was trained on a model with fingerprint "
            f"{adapter.model_fingerprint}, but {loaded.name} has {loaded.manifest.fingerprint}: "
            f"pass the fleet's base model with --model{_recorded_base(state_dir)}"
        )
    try:
        merged = merge_into(loaded.model, adapter)
    except ValueError as e:
        raise ExportError(f"global adapter v{adapter.version} does not fit {loaded.name}: {e}") from None
    record = {
        "source_state_dir": str(Path(state_dir).resolve()),
        "version": adapter.version,
        "round": adapter.round,
        "base_model": loaded.name,
        "model_fingerprint": adapter.model_fingerprint,
        "adapter": {**asdict(adapter.adapter), "target_modules": list(adapter.adapter.target_modules)},
        "merged_modules": merged,
        "frozen_delta_modules": sorted({n.rpartition(".")[0] for n in adapter.merged}),
        "tokenizer_saved": hasattr(loaded.tokenizer, "save_pretrained"),
        "tokenizer": "bytes" if not hasattr(loaded.tokenizer, "save_pretrained") else "tokenizers",
    }
    return loaded, adapter, record


def _save_hf(loaded: LoadedModel, folder: Path, record: dict) -> None:
    loaded.model.save_pretrained(folder, safe_serialization=True)
    if hasattr(loaded.tokenizer, "save_pretrained"):
        loaded.tokenizer.save_pretrained(folder)
    (folder / RECORD_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def _finish_onnx(folder: Path, tokenizer) -> None:
    """Stamp every graph IR ≤ 10 and leave the tokenizer as ``tokenizer.json``."""
    import onnx

    from .ort.optim import cap_ir_version

    for path in sorted(folder.glob("*.onnx")):
        model = onnx.load(str(path), load_external_data=False)
        if cap_ir_version(model):
            onnx.save(model, str(path))  # external data, if any, stays where it is
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not (folder / "tokenizer.json").exists():
        backend.save(str(folder / "tokenizer.json"))


def _recorded_base(state_dir: Path) -> str:
    """' (the state dir names ...)' when the aggregator was told its base model, else ''."""
    try:
        base = json.loads((Path(state_dir) / "state.json").read_text()).get("base_model", "")
    except (OSError, ValueError, AttributeError):
        return ""
    return f" (the state dir names {base!r})" if base else ""


def _write_folder(out: Path, write: Callable[[Path], None]) -> None:
    """``write`` into a temporary sibling of ``out``, then rename it into place. A folder being
    replaced (``--force``) is first renamed aside, so ``out`` never holds a mix of both."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # not mkdtemp: its 0700 would make the export unreadable to other users
        tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:12]}.tmp"
        tmp.mkdir()
    except OSError as e:
        raise ExportError(f"cannot create {out}: {e}") from None
    try:
        write(tmp)
        for path in tmp.rglob("*"):  # safetensors writes 0600: an export is meant to be shared
            path.chmod(0o755 if path.is_dir() else 0o644)
        replace_dir(tmp, out)  # a non-empty out only with --force (checked before loading)
    except OSError as e:
        raise ExportError(f"cannot write {out}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
