"""Latch's MQTT 3.1.1 broker: its own core (sessions, routing, durable store, fences) — see docs/broker.md."""
