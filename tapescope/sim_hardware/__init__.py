"""Hardware emulators that serve the drivers' real wire protocols (pty serial and TCP)."""
