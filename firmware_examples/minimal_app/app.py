"""The smallest real edge application with edgetune: join a fleet, train when told, use the
fleet's adapter. Run: python app.py BROKER_URL FLEET DEVICE_ID DATA_FILE [MODEL]"""

import logging
import sys

from edgetune.device import Device


def main(broker: str, fleet: str, device_id: str, data: str, model: str | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device = Device.join(broker, fleet, device_id, data, model)  # loads model + data, says hello
    device.start()  # trains in the background whenever the aggregator opens a round
    # ... the application's own work goes on here; we simply wait for the fleet to finish ...
    device.finished.wait()
    device.stop()
    adapter = device.current_adapter  # the merged global adapter: what inference should use
    if adapter is None:
        print("no global adapter received")
        return 1
    size = sum(t.size for t in adapter.tensors.values())
    print(f"{device_id}: global adapter v{adapter.version} ({size} parameters) ready for use")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
