"""tapescope: control system for high-throughput serial-section TEM on tape."""

__version__ = "0.1.0"
