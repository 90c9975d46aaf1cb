"""MQTT bridge: run telemetry out, operator commands in (docs/mqtt.md)."""
