"""The tape driver against its emulator over a real pseudo-terminal."""

from __future__ import annotations

import pytest

from tapescope.hardware.errors import DeviceError
from tapescope.hardware.tape import Tape
from tapescope.sim_hardware.scope import SimulatedScope


async def test_goto_and_barcode(sim: SimulatedScope) -> None:
    async with Tape(sim.tape.port, timeout_s=1.0) as tape:
        assert await tape.slot_count() == sim.world.p.n_slots
        st = await tape.goto(2)
        assert (st.state, st.slot) == ("IDLE", 2)
        assert await tape.barcode() == (2, sim.world.barcodes[2])
        with pytest.raises(DeviceError) as info:
            await tape.goto(99)
        assert info.value.code == 2
