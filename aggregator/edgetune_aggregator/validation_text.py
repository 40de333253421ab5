"""The validation gate's server-side score: the perplexity of a version on validation text the
operator gives the aggregator (``[gate] validation_text``), with the fleet's base model loaded
here (docs/operations.md).

This is the one part of the daemon that needs PyTorch and the model, so it is imported only
when configured. The model must be the fleet's (its fingerprint is checked when the fleet's
model is known): scores of another base would say nothing of the versions.
"""

from __future__ import annotations

import logging
from pathlib import Path

from edgetune.adapters.registry import adapter_kind
from edgetune.wire import GlobalAdapter, ModelManifest

log = logging.getLogger("edgetune_aggregator.daemon")


class ValidationText:
    def __init__(self, text: Path, model: str | None, blocks: int, seq_len: int):
        from edgetune.data import load_texts
        from edgetune.workload import Workload

        try:
            texts = load_texts(Path(text))
        except Exception as exc:
            raise ValueError(f"gate validation_text {text}: {exc}") from None
        from edgetune.models import load_model

        self.workload = Workload(load_model(model), [], texts, threads=None, model_ref=model or "default")
        self.blocks = self.workload.heldout_blocks(seq_len)[:blocks]
        if not len(self.blocks):
            raise ValueError(f"gate validation_text {text}: too little text for one block of {seq_len} tokens")
        log.info("the validation gate scores versions on %d block(s) of %s with %s", len(self.blocks), text,
                 self.workload.manifest.name)

    def check_model(self, fleet_model: ModelManifest) -> None:
        if self.workload.manifest.fingerprint != fleet_model.fingerprint:
            raise ValueError(f"gate validation_model is {self.workload.manifest.name} "
                             f"({self.workload.manifest.fingerprint}), not the fleet's {fleet_model.name} "
                             f"({fleet_model.fingerprint}): give the fleet's model")

    def perplexity(self, adapter: GlobalAdapter) -> float:
        """``adapter`` at full rank on the float32 base, over the validation blocks."""
        spec = adapter.adapter
        begin = adapter_kind(spec).training_start(spec, adapter.tensors, adapter.merged, None)
        trainer = self.workload.trainer(begin.spec)
        trainer.set_adapter(begin.tensors)
        trainer.set_merged(begin.merged)
        return float(trainer.perplexity(self.blocks))
