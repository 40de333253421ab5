"""Adapter kinds: each a package (``lora/``, ``prompt/``) behind one interface (``kind.py``),
listed in one registry (``registry.py``). What every kind shares, tensor checks and norms, is in
``tensors.py``; PEFT's file format in ``peft_format.py``. Pure numpy and no torch: both sides use
them, and trainers that need a framework are found through the kinds (``edgetune.trainers``).

Nothing here imports ``edgetune.wire`` at import time: the wire builds its ``AdapterSpec`` from
the registry."""
