"""Aggregation strategies: pure decisions about how updates become the next global adapter.
They never touch the network or the disk; the daemon feeds them validated updates."""

from .fedavg import FedAvg, fedavg

__all__ = ["FedAvg", "fedavg"]
