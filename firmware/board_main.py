# Copied to the board as /main.py by `latch firmware provision`.
from firmware.main import main

main("config.json")
