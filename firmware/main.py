"""The firmware's entry point.

On the board, /main.py runs `from firmware.main import main; main()`.
Under the Unix port: `micropython -m firmware.main /path/to/config.json`.
"""

import sys


def main(path="config.json"):
    import asyncio

    import firmware
    from firmware import config

    cfg = config.load(path)
    del sys.modules["firmware.config"], firmware.config, config  # read once: free it for the run
    from firmware.app import Firmware, make_hal

    hal = make_hal(cfg)
    try:
        asyncio.run(Firmware(cfg, hal).start())
    except KeyboardInterrupt:
        raise
    except Exception as e:
        # anything unexpected: say what, then start over from a clean slate
        sys.print_exception(e)
        if sys.platform != "linux":
            import time
            time.sleep_ms(2000)
        hal.reset()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "config.json")
