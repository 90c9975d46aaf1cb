"""The command line: every command's presentation (arguments, output, exit codes) lives in
this package; what the commands do lives in the packages they call."""

from .main import app, main

__all__ = ["app", "main"]
