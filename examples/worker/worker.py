"""A background worker: does one job every few seconds, logging to stdout."""

import os
import time
from pathlib import Path

COUNTER = Path(os.environ.get("EPIO_DATA_DIR", "/data")) / "ticks"
INTERVAL = float(os.environ.get("TICK_SECONDS", "5"))


def main() -> None:
    n = 0
    while True:
        n += 1
        try:
            COUNTER.write_text(str(n))
        except OSError as e:
            print(f"cannot record tick {n}: {e}", flush=True)
        print(f"tick {n}", flush=True)
        time.sleep(INTERVAL)


if __name__ == "__main__":
    main()
