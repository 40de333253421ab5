"""Per-device training text: the synthetic demo fleet, user files, and batching.

Pure Python and numpy (no torch), so data can be prepared, checked and tested on any machine.
``synthetic`` makes non-IID factory-log text for demos, ``files`` loads a device's ``--data``,
``split`` turns records into a held-out split, packed token blocks and shuffled batches.
"""

from edgetune.data.files import DATA_SUFFIXES, DataError, discover_device_files, load_texts
from edgetune.data.split import HELDOUT_FRACTION, VALIDATION_FRACTION, BlockSampler, pack_blocks, split_heldout
from edgetune.data.synthetic import (
    DEFAULT_RECORDS_PER_DEVICE,
    PROFILES,
    LineProfile,
    Measurement,
    Station,
    generate_device_texts,
    profile_for_device,
    write_demo_data,
)

__all__ = [
    "HELDOUT_FRACTION", "VALIDATION_FRACTION",
    "DATA_SUFFIXES",
    "DEFAULT_RECORDS_PER_DEVICE",
    "PROFILES",
    "BlockSampler",
    "DataError",
    "LineProfile",
    "Measurement",
    "Station",
    "discover_device_files",
    "generate_device_texts",
    "load_texts",
    "pack_blocks",
    "profile_for_device",
    "split_heldout",
    "write_demo_data",
]
