"""Latch's embedded MQTT broker: amqtt with Latch's identities and topic fences."""
