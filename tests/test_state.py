"""The run's state machine as documented: docs/acquisition.md's table is TRANSITIONS."""

from __future__ import annotations

from pathlib import Path

from tapescope.acquisition.state import TRANSITIONS, RunState, markdown_table

DOC = Path(__file__).resolve().parents[1] / "docs" / "acquisition.md"


def test_the_documented_state_table_is_the_one_the_engine_enforces() -> None:
    text = DOC.read_text()
    assert markdown_table() in text, "docs/acquisition.md's state table differs from TRANSITIONS: " \
        "paste tapescope.acquisition.state.markdown_table() in"


def test_no_state_but_the_terminal_ones_is_a_trap() -> None:
    for st in RunState:
        assert (RunState.ABORTED in TRANSITIONS[st]) == (not st.terminal)
