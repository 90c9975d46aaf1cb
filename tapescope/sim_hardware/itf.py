"""Interleaved 2 of 5 (ITF) barcodes, drawn as bars: the labels printed beside GridTape slots.

ITF encodes an even number of digits in pairs: the first digit of a pair in the widths of
five bars, the second in the five spaces between them; two of each five are wide. The
readers in hardware/barcode_camera.py decode them with a barcode library that nobody here
wrote, so the simulated labels prove the real decoding path.
"""

from __future__ import annotations

import numpy as np

# Which of the five elements are wide, per digit (the standard's table).
_WIDE = {
    "0": "00110", "1": "10001", "2": "01001", "3": "11000", "4": "00101",
    "5": "10100", "6": "01100", "7": "00011", "8": "10010", "9": "01010",
}
START = (1, 1, 1, 1)        # narrow bar, space, bar, space
STOP = (3, 1, 1)            # wide bar, narrow space, narrow bar
QUIET = 10                  # quiet zone, narrow modules, each side


def widths(digits: str, wide: int = 3) -> list[int]:
    """Element widths in narrow modules, bar first, quiet zones excluded."""
    if not digits.isdigit() or len(digits) % 2:
        raise ValueError(f"ITF encodes an even number of digits, not {digits!r}")
    out = list(START)
    for a, b in zip(digits[::2], digits[1::2], strict=True):
        for wa, wb in zip(_WIDE[a], _WIDE[b], strict=True):
            out += [wide if wa == "1" else 1, wide if wb == "1" else 1]
    out += [wide if w == 3 else w for w in STOP]
    return out


def modules(digits: str, wide: int = 3) -> np.ndarray:
    """The barcode as a row of modules: True where a bar is, quiet zones included."""
    row: list[bool] = [False] * QUIET
    for i, w in enumerate(widths(digits, wide)):
        row += [i % 2 == 0] * w
    row += [False] * QUIET
    return np.array(row, dtype=bool)
