"""FedPipe planning: a cost model of LoRA training (memory, time) and a planner that picks
each device's configuration from its profile. Pure functions; scipy only for the MILP form."""
