"""An edge application that answers locally with its own adapter: it trains with its fleet,
personalizes on its data, and serves the personal adapter where that does no worse than the
fleet's version on its own validation text, else the fleet's (see README.md).
Run: python app.py BROKER_URL FLEET DEVICE_ID DATA_FILE [MODEL] < prompts.txt"""

import logging
import sys

from edgetune.device import Device


def main(broker: str, fleet: str, device_id: str, data: str, model: str | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device = Device.join(broker, fleet, device_id, data, model, exit_when_finished=False)
    device.start()  # trains whenever the fleet opens a round
    device.finished.wait()  # (a real app answers from the start: the global adapter serves meanwhile)
    try:
        device.personalize(report=False)  # served only if no worse than the fleet's version
    except Exception as exc:  # e.g. too little data: the fleet's version serves
        logging.warning("no personal adapter (%s): serving the fleet's", exc)
    for prompt in (line.strip() for line in sys.stdin):
        if prompt:
            print(f"[{device.serving}] {prompt!r} -> {device.generate(prompt, 16)!r}", flush=True)
    device.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
