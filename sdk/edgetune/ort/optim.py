"""The artifacts' optimizer graph: AdamW with PyTorch's update rule, and clipping by global norm.

It is part of the artifacts for those who drive ONNX Runtime's own ``Optimizer`` with them;
edgetune's trainer steps in numpy instead (``trainers/adamw.py`` says why). ONNX Runtime's
generated AdamW uses Hugging Face's variant (``adam_mode=1``: bias correction folded into the
step size, epsilon added to the uncorrected √v) and epsilon 1e-6, so it would drift from
``torch.optim.AdamW``; this graph asks ORT's ``AdamWOptimizer`` kernel for PyTorch's rule
(``adam_mode=0``, eps 1e-8). Weight decay and the clipping norm are attributes of the graph:
ORT feeds only the learning rate at run time.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .artifacts import OptimizerSettings

__all__ = ["IR_VERSION", "OPSET", "build_optimizer_model", "cap_ir_version"]

#: ONNX Runtime 1.19 reads ONNX IR ≤ 10; onnx ≥ 1.23 stamps 14 on what it writes
IR_VERSION = 10
#: opset 17 fails in ORT's gradient builder at LayerNormalization
OPSET = 15


def build_optimizer_model(trainable: Sequence[tuple[str, tuple[int, ...]]], settings: OptimizerSettings,
                          path: Path) -> None:
    """Write the optimizer graph for ``trainable`` (name, shape) parameters to ``path``."""
    import onnx

    from .runtime import training

    training()
    from onnxruntime.training import onnxblock
    from onnxruntime.training.onnxblock.optim import optim

    class _TorchRuleAdamW(optim.AdamWOptimizer):
        def build(self, *names: str) -> str:
            attributes = {
                "alpha": self._betas[0], "beta": self._betas[1], "epsilon": self._eps,
                "weight_decay": self._weight_decay, "correct_bias": 1, "adam_mode": 0,
            }
            return self._build_optimizer_node(list(names), optim._graph_utils.generate_graph_name("adamw.updated_flag"),
                                              "AdamWOptimizer", attributes)

    clip = optim.ClipGradNorm(settings.max_grad_norm) if settings.max_grad_norm > 0 else None
    block = optim.AdamW(betas=settings.betas, eps=settings.eps, weight_decay=settings.weight_decay, clip_grad=clip)
    block._adamw = _TorchRuleAdamW(betas=tuple(settings.betas), eps=settings.eps, weight_decay=settings.weight_decay)
    # the graph needs each parameter's name, type and shape only; the values stay in the checkpoint
    protos = [_empty_param(name, shape) for name, shape in trainable]
    with onnxblock.empty_base(opset_version=OPSET):
        block((protos, []))
        model = block.to_model_proto()
    cap_ir_version(model)
    onnx.save(model, str(path))


def _empty_param(name: str, shape: tuple[int, ...]):
    import onnx

    tensor = onnx.TensorProto()
    tensor.name = name
    tensor.data_type = onnx.TensorProto.FLOAT
    tensor.dims.extend(shape)
    return tensor


def cap_ir_version(model) -> bool:
    """Stamp an IR version ONNX Runtime 1.19 reads (the graphs use nothing newer than IR 10
    allows at opset 15). True if it changed."""
    if model.ir_version > IR_VERSION:
        model.ir_version = IR_VERSION
        return True
    return False
