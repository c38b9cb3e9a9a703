"""The `latch` command: composes the broker, the API and the simulator."""
