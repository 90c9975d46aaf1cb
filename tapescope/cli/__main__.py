"""``python -m tapescope.cli``: the ``tapescope`` command."""

from .main import main

main()
