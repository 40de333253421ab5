"""An edge application on a device without PyTorch: it trains the fleet's LoRA adapter with
ONNX Runtime (pip install 'edgetune[ort]'). The artifacts come from the aggregator
(`edgetune-aggregator serve ... --ort-artifacts DIR`) the first time, or from a copied folder.
Run: python app.py BROKER_URL FLEET DEVICE_ID DATA_FILE ARTIFACTS_DIR"""

import logging
import sys

from edgetune.device import Device


def main(broker: str, fleet: str, device_id: str, data: str, artifacts: str) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # downloads the artifacts into ARTIFACTS_DIR if it holds none, checks them, says hello
    device = Device.join(broker, fleet, device_id, data, trainer="ort", artifacts=artifacts)
    device.start()  # trains in the background whenever the aggregator opens a round
    device.finished.wait()
    device.stop()
    adapter = device.current_adapter  # the merged global adapter, as on a PyTorch device
    if adapter is None:
        print("no global adapter received")
        return 1
    size = sum(t.size for t in adapter.tensors.values())
    print(f"{device_id}: global adapter v{adapter.version} ({size} parameters), trained with "
          f"{device.workload.backend}, ready for use")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
