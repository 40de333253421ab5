"""The fleet simulator: a fleet of real devices (real models, real text, real training) and the
real daemon on one machine, in simulated time, so that a Raspberry Pi is as slow as a Raspberry
Pi and its slow uplink is as slow as its uplink (``edgetune simulate --fleet FLEET.yaml``,
``docs/simulation.md``).
"""

from .clock import MachineSpeed, SimTime, SimulatedDeviceClock
from .fleet import FleetError, FleetSpec, SimDevice, fleet_from_dict, load_fleet
from .runner import SimResult, Simulation, SimulationError, build_workloads

__all__ = ["FleetError", "FleetSpec", "MachineSpeed", "SimDevice", "SimResult", "SimTime", "Simulation",
           "SimulatedDeviceClock", "SimulationError", "build_workloads", "fleet_from_dict", "load_fleet"]
