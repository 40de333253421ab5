"""Which model the fleet trains: the operator's choice, never the first device's.

Before, the first hello fixed the fleet's model manifest, so one hostile or misconfigured
device could make every honest device's updates ``wrong_shape`` (a different model), or make
the daemon allocate and write an adapter for a 50-million-parameter fantasy before any update
came. Now the manifest is pinned before any device is heard:

- ``--model-manifest FILE`` (``AggregatorConfig.model``): a file ``edgetune manifest --model M``
  wrote on a machine that has the model;
- nothing: the default model's manifest, shipped in this package (SmolLM2-135M-Instruct, the
  model ``edgetune device run`` trains when given no ``--model``);
- ``--model-from-first-hello`` (``model_from_first_hello``): the old behaviour, for trusted
  labs that switch models often. The adapter-size bound of ``Membership.check_model`` still applies.

A hello for another model is refused as ``model_mismatch`` and affects no other device.
"""

from __future__ import annotations

import functools
import json
from importlib import resources

from edgetune.wire import ModelManifest
from edgetune.wire.manifest_file import manifest_from_dict

DEFAULT_MANIFEST = "default.json"


@functools.cache
def default_manifest() -> ModelManifest:
    """The default model's manifest (what ``edgetune manifest`` prints for it; a test keeps the two equal)."""
    text = resources.files(__package__).joinpath("models", DEFAULT_MANIFEST).read_text()
    return manifest_from_dict(json.loads(text))


def pinned_model(model: ModelManifest | None, from_first_hello: bool) -> ModelManifest | None:
    """The manifest the fleet is pinned to (None: the first admitted hello's, as asked)."""
    if model is not None:
        return model
    return None if from_first_hello else default_manifest()
