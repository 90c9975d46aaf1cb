from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tapescope.sim_hardware.scope import SimulatedScope
from tapescope.sim_hardware.world import WorldParams

SMALL_WORLD = WorldParams(seed=3, n_slots=4, tile_px=(128, 128), section_px=(512, 512))


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    """As in ophyd-async: a test that leaves a task running fails."""
    yield
    current = asyncio.current_task()
    # Let tasks that are finishing their cancellation run to completion first.
    for _ in range(3):
        await asyncio.sleep(0)
    leaked = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    for t in leaked:
        t.cancel()
    assert not leaked, f"test leaked tasks: {leaked}"


@pytest.fixture
async def sim() -> AsyncIterator[SimulatedScope]:
    async with SimulatedScope(SMALL_WORLD) as s:
        yield s
