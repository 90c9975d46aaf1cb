"""The subset of the ASI MS-2000 ASCII command set that tapescope speaks.

Shared by the driver (hardware/stage.py) and the emulator (sim_hardware/stage.py) so
that both sides agree byte for byte. See docs/protocols.md. Units on the wire are
tenths of a micrometre (ASI's native unit); tapescope works in nanometres.

Commands end with CR; replies end with CR LF.
    M X=<f> Y=<f>    move absolute            -> ":A"
    R X=<f> Y=<f>    move relative            -> ":A"
    W X Y            where                    -> ":A <x> <y>"
    /                status                   -> "N" (idle) or "B" (busy)
    HALT             stop all axes            -> ":A"
    S X=<f> Y=<f>    set speed, mm/s          -> ":A"
    S X?             speed of X, mm/s         -> ":A X=<f>"
Errors are ":N-<code>"; the codes are ASI's.
"""

from __future__ import annotations

NM_PER_UNIT = 100.0  # one ASI unit is 0.1 um
NM_S_PER_MM_S = 1.0e6

ERRORS: dict[int, str] = {
    1: "unknown command",
    2: "unrecognized axis parameter",
    3: "missing parameters",
    4: "parameter out of range",
    5: "operation failed",
    6: "undefined error",
    21: "serial command halted by the HALT command",
}


def nm_to_units(nm: float) -> str:
    # Two decimals: 1 nm resolution on the wire, finer than any stage's repeatability.
    return f"{nm / NM_PER_UNIT:.2f}"


def units_to_nm(text: str) -> float:
    return float(text) * NM_PER_UNIT
