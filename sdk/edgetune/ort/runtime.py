"""Import ONNX Runtime's training API without PyTorch.

onnxruntime-training 1.19.2's ``onnxruntime/training/__init__.py`` imports its legacy ``amp``
and ``optim`` packages, which ``import torch`` unconditionally: on a device without PyTorch,
``import onnxruntime.training.api`` fails although the on-device training API itself (``api``,
``onnxblock``) needs only the compiled runtime, numpy and onnx. The release is the last one,
so this will not be fixed upstream. :func:`training` registers ``onnxruntime.training`` as a
bare package over the installed folder, without running that ``__init__``; its subpackages
then import as usual. It does so whether or not torch is installed, so both kinds of device
take the same path. (Where torch is installed, ``import onnxruntime`` itself imports it,
through ``onnxruntime.tools``; that is not ours to avoid.)
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

__all__ = ["training"]

_PACKAGE = "onnxruntime.training"


def training() -> types.ModuleType:
    """``onnxruntime.training`` with its ``api`` imported (import ``onnxblock`` from it when
    building graphs); raises ImportError with what to install when onnxruntime-training is
    missing (or only ``onnxruntime`` is)."""
    package = sys.modules.get(_PACKAGE)
    if package is None:
        _refuse_both_distributions()
        try:
            import onnxruntime
        except ImportError as exc:
            raise ImportError("ONNX Runtime training is not installed: pip install 'edgetune[ort]' "
                              "(onnxruntime-training; never together with onnxruntime)") from exc
        spec = importlib.util.find_spec(_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("this ONNX Runtime has no training support (the plain onnxruntime distribution?): "
                              "pip uninstall onnxruntime && pip install 'edgetune[ort]'")
        package = types.ModuleType(_PACKAGE)
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        package.__package__ = _PACKAGE
        package.__file__ = spec.origin
        sys.modules[_PACKAGE] = package
        onnxruntime.training = package
    importlib.import_module(f"{_PACKAGE}.api")
    return package


def _refuse_both_distributions() -> None:
    """onnxruntime and onnxruntime-training install the same ``onnxruntime`` module: with both,
    whichever was installed last has overwritten the other's files, and the mix fails in
    confusing ways. Say so instead."""
    from importlib import metadata

    installed = []
    for distribution in ("onnxruntime", "onnxruntime-training"):
        try:
            metadata.distribution(distribution)
            installed.append(distribution)
        except metadata.PackageNotFoundError:
            pass
    if len(installed) == 2:
        raise ImportError("both onnxruntime and onnxruntime-training are installed; they own the same module and "
                          "overwrite each other: pip uninstall -y onnxruntime onnxruntime-training && "
                          "pip install 'edgetune[ort]'")
