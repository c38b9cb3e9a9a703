"""The ground floor: what every other part of Latch stands on, importing no part of Latch itself.

- `settings`: every setting of every process (pydantic-settings, `LATCH_*` environment variables), and the
  helpers that read them (broker lists, TLS contexts);
- `logs`: the log format and the request id carried through a request's log lines;
- `geo`: positions and areas (the simulated fleet's streets, the riders' "nearby" search).

The broker, the API, the simulator and the CLI import these; nothing here imports them (tests/latch/test_layers.py
checks it). Before issue 16 these lived in `latch/`, the CLI's package, so every layer below the CLI reached up
into it for its settings.
"""
