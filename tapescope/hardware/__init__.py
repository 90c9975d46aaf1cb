"""Async device drivers. Imports nothing else of tapescope (see docs/architecture.md)."""
