"""Device profiles: measure this machine (``measure_profile``) or read a class of device from
a YAML file (``load_profile``), for the planner to size each device's work.

Importing this package is cheap: torch, bitsandbytes and PyYAML load only when used.
"""

from .files import ProfileError, dump_profile, load_profile, load_profiles, parse_size, save_profile
from .measure import measure_profile

__all__ = ["ProfileError", "dump_profile", "load_profile", "load_profiles", "measure_profile", "parse_size", "save_profile"]
