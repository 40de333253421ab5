"""Base models for devices: loading (GGUF, Hugging Face folders, tiny test models) and the
manifest a device announces. Importing this package does not import torch; loading does."""

from .loading import (
    TINY_MODELS,
    ByteTokenizer,
    LoadedModel,
    ModelError,
    default_gguf,
    default_targets,
    load_model,
    manifest_of,
    prepare_model,
)

__all__ = [
    "TINY_MODELS",
    "ByteTokenizer",
    "LoadedModel",
    "ModelError",
    "default_gguf",
    "default_targets",
    "load_model",
    "manifest_of",
    "prepare_model",
]
