"""Moving bytes between devices and the aggregator.

``base.Transport`` is the interface; ``memory`` implements it in-process (tests, simulations)
and ``mqtt`` over a real broker with paho-mqtt. ``channel`` sits on top and speaks messages:
encoding, chunking and reassembly. ``embedded_broker`` runs an MQTT broker in-process.
``mirrored`` is the daemon's client of a clustered broker whose nodes index retained
messages apart (ejabberd).
"""

from .base import BrokerUrl, Transport, TransportError, TransportStats, Will, open_transport

__all__ = ["BrokerUrl", "Transport", "TransportError", "TransportStats", "Will", "open_transport"]
