"""The ESP32 HAL under the MicroPython Unix port, against a simulated board (mp/shim/machine.py
shadows the built-in `machine`)."""
from tests.firmware.fwsupport import MP_DIR, run_mp


def test_esp32_hal_against_simulated_board(micropython):
    r = run_mp(micropython, MP_DIR / "run_cases.py", "esp32_hal_cases", extra_paths=[MP_DIR / "shim"], timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "DONE 7 passed, 0 failed" in r.stdout, r.stdout


async def test_firmware_with_the_esp32_hal(stack, micropython, tmp_path):
    """The whole firmware with hal_esp32 (motor driver, reed switch with bounce, battery ADC,
    watchdog) and the WiFi station on the simulated board, against the real API and broker."""
    from tests.firmware.fwsupport import FirmwareProcess, device_config

    reg = await stack.register("bike-0001")
    cfg = device_config(reg, stack.mqtt_host, stack.mqtt_port, tmp_path / "bike-0001", hal="esp32",
                        wdt_ms=5000, driver_timeout_ms=500, wifi={"ssid": "Shop", "password": "secret"})
    fw = FirmwareProcess(micropython, tmp_path / "bike-0001", cfg, extra_paths=[MP_DIR / "shim"])
    await fw.start()
    stack.locks.append(fw)
    await fw.wait_line("clock synchronised", timeout=20)
    await fw.wait_line(r"board 240ac4123456")
    await fw.wait_line(r"wifi: up 192\.168\.4\.23")
    await stack.wait_presence("bike-0001", True)
    r = await stack.command("bike-0001", "unlock", wait=10)
    assert r.json()["status"] == "succeeded", r.text + "\n" + fw.output()
    await fw.wait_line(r'ack (?=.*"result": "succeeded")(?=.*"locked": false)(?=.*"battery": 55)')
    r = await stack.command("bike-0001", "lock", wait=10)
    assert r.json()["status"] == "succeeded", r.text + "\n" + fw.output()
    r = await stack.command("bike-0001", "locate", wait=10)
    assert r.json()["status"] == "succeeded", r.text + "\n" + fw.output()
