"""The fleet as the daemon's parts share it: its persistent state, the global adapter now
published, and the strategy its versions follow.

One object, handed to every part that needs it, instead of each part reaching into the daemon:
parts read ``state``, ``global_adapter`` and ``strategy`` here and change them only through
these methods, so what must survive a restart is saved where it changes (``StateStore``).
"""

from __future__ import annotations

import dataclasses

from edgetune.adapters.kind import AdapterKind
from edgetune.adapters.registry import adapter_kind
from edgetune.wire import GlobalAdapter

from .store import FleetState, StateStore
from .strategies import Strategy


class Fleet:
    def __init__(self, store: StateStore):
        self.store = store
        #: None until the fleet starts (first devices) or is resumed from the state dir
        self.state: FleetState | None = None
        #: the adapter devices hold now (retained on the broker)
        self.global_adapter: GlobalAdapter | None = None
        #: made once the fleet's state is known (its strategy is fixed for a state dir)
        self.strategy: Strategy | None = None

    @property
    def kind(self) -> AdapterKind:
        """The kind of adapter the fleet trains (``edgetune.adapters.registry``)."""
        return adapter_kind(self.state.adapter)

    def update(self, save: bool = False, **changes) -> FleetState:
        """Change fields of the state (``save``: and write it, atomically, before anyone is told)."""
        self.state = dataclasses.replace(self.state, **changes)
        if save:
            self.store.save_state(self.state)
        return self.state

    def save(self) -> None:
        self.store.save_state(self.state)
