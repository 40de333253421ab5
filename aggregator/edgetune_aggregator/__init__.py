"""edgetune_aggregator: the daemon that runs federated rounds and merges adapters.

Needs numpy, msgpack and paho-mqtt only: merging is numpy math, and the wire protocol and
transports come from ``edgetune`` (which does not import torch either).
"""

from edgetune import __version__

__all__ = ["__version__"]
