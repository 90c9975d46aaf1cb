"""The root of tapescope's own errors.

Every error the package raises on purpose (bad input, a device that will not answer, a run
that cannot resume) derives from `TapescopeError`, and its message is written for a person:
it names what is wrong and where. A command turns a TapescopeError into one line and exit
code 2 (or the code its documentation gives); anything else is a bug and shows as one.
Errors that also are a ValueError or an OSError keep that base, for callers that catch it.
"""

from __future__ import annotations


class TapescopeError(Exception):
    """An error of tapescope's own, with a message meant for a person."""
