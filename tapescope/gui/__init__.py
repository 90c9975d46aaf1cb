"""Operator GUI (pyqtgraph on PySide6). Subscribes to the same engine events as the CLI."""
