"""The aggregator must run on a server with numpy, msgpack and paho-mqtt only."""

import subprocess
import sys

CHECK = """
import sys
sys.modules["torch"] = None  # any import of torch now fails loudly
import edgetune, edgetune_aggregator, edgetune_aggregator.daemon, edgetune_aggregator.cli, edgetune.device
heavy = {"torch", "transformers", "peft", "tqdm", "amqtt", "safetensors", "gguf"} & {m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}
print(sorted(heavy))
"""


def test_aggregator_and_sdk_core_import_without_heavy_packages():
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
