"""Tape driver for GridTape's reel controller (htem/GridTapeStage, firmware temcagt_reel).

The controller is an Arduino that speaks comando commands (hardware/comando.py) at
115200 baud. It knows drives, microsteps and load-cell counts, not slots: going to a slot
is the host's work, done here as GridTape's own host software does it:

1. the tape is under tension (the load cell reads within limits), else tension it;
2. step both pinch drives by the slots' distance (``step_tape`` with the wait and
   tension-watch options: the firmware halts every drive and sends ``error 20`` if the
   tension leaves its limits while moving: a jam, a break, slack tape);
3. look with the tape camera (hardware/barcode_camera.py): which slot's barcode is over
   the aperture at the beam, and how far the aperture is off the beam axis;
4. step again by what is left, until that slot is centred within ``centre_tolerance_mm``.

The engine sees the same interface as the line-protocol tape (hardware/tape.py): state,
goto, feed, rewind, barcode, tension, clear_jam, slot_count.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import serial

from . import comando
from .barcode_camera import BarcodeCamera
from .device import Device
from .errors import DeviceError, DeviceTimeout, ProtocolError
from .serial_line import SerialLine
from .tape import ERR_JAMMED, TapeState

log = logging.getLogger(__name__)

# -- the firmware's interface (temcagt_reel.ino; docs/commands.md of GridTapeStage) -------
CMD_ERROR, CMD_PING = 0, 1
CMD_READ_TENSION, CMD_SET_LED = 5, 6
CMD_RESET_DRIVES, CMD_GET_BUSY, CMD_GET_STATUS = 10, 11, 12
CMD_HOLD_DRIVE, CMD_RELEASE_DRIVE, CMD_ROTATE_DRIVE = 15, 16, 17
CMD_SET_SPEED, CMD_GET_SPEED, CMD_MOVE_DRIVE = 18, 19, 20
CMD_RUN_REELS, CMD_STOP_REELS, CMD_STOP_ALL, CMD_RELEASE_ALL, CMD_HALT_ALL = 21, 22, 23, 24, 25
CMD_STEP_TAPE, CMD_SET_TENSION_LIMITS, CMD_GET_TENSION_LIMITS = 30, 31, 32
COMMAND_NAMES = {
    CMD_ERROR: "error", CMD_PING: "ping", CMD_READ_TENSION: "read_tension", CMD_SET_LED: "set_led",
    CMD_RESET_DRIVES: "reset_drives", CMD_GET_BUSY: "get_busy", CMD_GET_STATUS: "get_status",
    CMD_HOLD_DRIVE: "hold_drive", CMD_RELEASE_DRIVE: "release_drive", CMD_ROTATE_DRIVE: "rotate_drive",
    CMD_SET_SPEED: "set_speed", CMD_GET_SPEED: "get_speed", CMD_MOVE_DRIVE: "move_drive",
    CMD_RUN_REELS: "run_reels", CMD_STOP_REELS: "stop_reels", CMD_STOP_ALL: "stop_all",
    CMD_RELEASE_ALL: "release_all", CMD_HALT_ALL: "halt_all", CMD_STEP_TAPE: "step_tape",
    CMD_SET_TENSION_LIMITS: "set_tension_limits", CMD_GET_TENSION_LIMITS: "get_tension_limits",
}
FEED_REEL, FEED_PINCH, PICKUP_REEL, PICKUP_PINCH = 0b00, 0b01, 0b10, 0b11
DRIVES = (FEED_REEL, FEED_PINCH, PICKUP_REEL, PICKUP_PINCH)
COLLECT, DISPENSE, TENSION, UNTENSION = 0, 1, 2, 3
ST_OPTS_RUN_REELS, ST_OPTS_WAIT, ST_OPTS_WATCH = 0x01, 0x02, 0x04
ERR_ERROR, ERR_INVALID_CMD, ERR_MISSING_ARG, ERR_INVALID_ARG = 0, 1, 1, 2
ERR_INVALID_DRIVE, ERR_INVALID_DIRECTION, ERR_TENSION = 10, 11, 20
ERROR_TEXT = {ERR_ERROR: "error (or missing argument)", ERR_INVALID_ARG: "invalid argument",
              ERR_INVALID_DRIVE: "invalid drive", ERR_INVALID_DIRECTION: "invalid direction",
              ERR_TENSION: "tension out of limits while moving: every drive halted"}
MM_PER_USTEP = 0.002734375        # pinch roller travel per microstep (the firmware's constant)

# L6470 status word (the drivers' datasheet); the fault flags are active low.
ST_HIZ, ST_BUSY, ST_DIR = 0x0001, 0x0002, 0x0010
ST_NOTPERF_CMD, ST_WRONG_CMD = 0x0080, 0x0100
ST_UVLO, ST_TH_WRN, ST_TH_SD, ST_OCD = 0x0200, 0x0400, 0x0800, 0x1000
ST_STEP_LOSS_A, ST_STEP_LOSS_B = 0x2000, 0x4000


def status_faults(word: int) -> list[str]:
    """What an L6470 status word says is wrong, in words (empty: nothing)."""
    out = []
    for bit, text in ((ST_UVLO, "supply undervoltage"), (ST_TH_SD, "thermal shutdown"),
                      (ST_TH_WRN, "thermal warning"), (ST_OCD, "overcurrent"),
                      (ST_STEP_LOSS_A, "stall (bridge A)"), (ST_STEP_LOSS_B, "stall (bridge B)")):
        if not word & bit:
            out.append(text)
    if word & ST_WRONG_CMD:
        out.append("wrong command")
    return out


@dataclass(frozen=True)
class Tension:
    """Load cell counts <-> grams, and the limits a move must stay within (grams)."""

    zero_counts: float = 8_457_000.0
    counts_per_g: float = 100.0
    low_g: float = 30.0
    high_g: float = 130.0

    def grams(self, counts: int) -> float:
        return (counts - self.zero_counts) / self.counts_per_g

    def counts(self, grams: float) -> int:
        return round(self.zero_counts + grams * self.counts_per_g)


class GridTape(Device):
    name = "tape"

    def __init__(
        self, url: str, camera: BarcodeCamera, *, slots: int, slot_pitch_mm: float = 6.0,
        tension: Tension | None = None, speed_mm_s: float = 20.0, centre_tolerance_mm: float = 0.05,
        max_corrections: int = 4, baudrate: int = 115200, timeout_s: float = 2.0,
        move_timeout_s: float = 30.0, boot_s: float = 5.0,
    ) -> None:
        self._line = SerialLine(self.name, url, baudrate=baudrate, timeout_s=timeout_s)
        self.camera = camera
        self.slots = slots
        self.pitch_mm = slot_pitch_mm
        self.tension_cal = tension or Tension()
        self.speed_mm_s = speed_mm_s
        self.centre_tolerance_mm = centre_tolerance_mm
        self.max_corrections = max_corrections
        self.timeout_s = timeout_s
        self.move_timeout_s = move_timeout_s
        self.boot_s = boot_s
        self.on_readout: Callable[[dict[str, Any], bool], None] | None = None
        self._slot = -1                 # the slot last seen centred; -1: not known
        self._jammed = False
        self._ping = 0

    # -- the wire ---------------------------------------------------------------------------
    def _read_reply(self, port: serial.SerialBase, want: int, deadline_s: float) -> comando.Command:
        """Read messages until one with command id `want` (or an error) arrives."""
        deframer = comando.Deframer()
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            chunk = port.read(max(port.in_waiting, 1))
            for payload in deframer.feed(chunk):
                try:
                    cmd = comando.parse_payload(payload)
                except comando.ComandoError:
                    continue
                if cmd.protocol == comando.COMMAND_PROTOCOL and cmd.cid in (want, CMD_ERROR):
                    return cmd
        junk = deframer.skipped + deframer.pending()
        extra = f"; {junk} bytes arrived that are no valid message (line noise?)" if junk else ""
        raise DeviceTimeout(self.name, f"no {COMMAND_NAMES.get(want, want)} reply within {deadline_s:g} s{extra}")

    async def _ask(self, cid: int, types: str = "", *values: float | int | bool,
                   reply: int | None = None, deadline_s: float | None = None) -> comando.Command:
        msg = comando.command(cid, types, *values)
        want = cid if reply is None else reply
        got = await self._line.exchange(msg, lambda port: self._read_reply(
            port, want, deadline_s if deadline_s is not None else self.timeout_s))
        self._check(cid, got)
        return got

    def _check(self, cid: int, got: comando.Command) -> None:
        """An ``error`` message in reply to command `cid` becomes a DeviceError naming both."""
        if got.cid == CMD_ERROR:
            code = int(got.take("byte")) if got.has_arg() else ERR_ERROR
            raise DeviceError(self.name, f"{COMMAND_NAMES.get(cid, cid)}: controller error {code}: "
                              f"{ERROR_TEXT.get(code, 'unknown code')}", code)

    async def _tell(self, cid: int, types: str = "", *values: float | int | bool) -> None:
        """A command the firmware does not answer, followed by a ping: the echo shows that
        it arrived, and an error message before the echo is that command's."""
        self._ping = (self._ping + 1) % 256
        msg = comando.command(cid, types, *values) + comando.command(CMD_PING, "byte", self._ping)
        got = await self._line.exchange(msg, lambda port: self._read_reply(port, CMD_PING, self.timeout_s))
        self._check(cid, got)
        if int(got.take("byte")) != self._ping:
            raise ProtocolError(self.name, f"{COMMAND_NAMES.get(cid, cid)}: ping echo out of step")

    async def ping(self, code: int = 0) -> int:
        return int((await self._ask(CMD_PING, "byte", code)).take("byte"))

    # -- connect ----------------------------------------------------------------------------
    async def connect(self) -> None:
        await self._line.open()
        await self.camera.connect()
        # Opening the port resets an Arduino; it answers after a few seconds of boot. Until
        # then (and through a reply lost to line noise meanwhile) the set-up is tried again.
        deadline = time.monotonic() + self.boot_s
        while True:
            try:
                await self.ping(42)
                t = self.tension_cal
                await self._tell(CMD_SET_TENSION_LIMITS, "int32 int32", t.counts(t.low_g), t.counts(t.high_g))
                await self._ensure_tension()
                break
            except (DeviceTimeout, ProtocolError):
                if time.monotonic() > deadline:
                    raise
        self._slot = (await self.camera.sight()).slot

    async def close(self) -> None:
        await self.camera.close()
        await self._line.close()

    # -- what the engine asks -----------------------------------------------------------------
    async def slot_count(self) -> int:
        return self.slots

    async def tension(self) -> float:
        """Tape tension in grams (the load cell's mean of 8 samples)."""
        got = await self._ask(CMD_READ_TENSION, "byte", 8)
        return self.tension_cal.grams(int(got.take("int32")))

    async def drive_status(self, drive: int) -> int:
        word = int((await self._ask(CMD_GET_STATUS, "byte", drive)).take("int16"))
        return word & 0xFFFF

    async def state(self) -> TapeState:
        if self._jammed:
            return TapeState("JAMMED", self._slot)
        busy = int((await self._ask(CMD_GET_BUSY)).take("byte"))
        return TapeState("MOVING" if busy else "IDLE", self._slot)

    async def status(self) -> TapeState:
        return await self.state()

    async def barcode(self) -> tuple[int, str]:
        seen = await self.camera.sight()
        return seen.slot, seen.code

    async def clear_jam(self) -> TapeState:
        """Reset the drives (their stall flags clear, the tape comes free), tension the tape
        again and look where it is."""
        await self._tell(CMD_RESET_DRIVES)
        self._jammed = False
        await self._ensure_tension()
        self._slot = (await self.camera.sight()).slot
        return await self.state()

    async def goto(self, slot: int) -> TapeState:
        if not 0 <= slot < self.slots:
            raise DeviceError(self.name, f"slot {slot} is not on the tape (0..{self.slots - 1})")
        if self._jammed:
            raise DeviceError(self.name, f"tape jammed at slot {self._slot}; clear the jam, then retry", ERR_JAMMED)
        await self._ensure_tension()
        seen = await self.camera.sight()
        for attempt in range(self.max_corrections + 1):
            off_mm = (slot - seen.slot) * self.pitch_mm + seen.offset_mm
            if seen.slot == slot and abs(seen.offset_mm) <= self.centre_tolerance_mm:
                self._slot = slot
                self._readout(slot, False)
                return TapeState("IDLE", slot)
            if attempt == self.max_corrections:
                break
            if attempt > 0 and seen.slot != slot:
                self.notice(f"after a move to slot {slot} the tape camera sees slot {seen.slot}: "
                            f"the tape slipped by {seen.slot - slot:+d} slot(s); moving again")
            await self._step(off_mm, slot)
            seen = await self.camera.sight()
            self._slot = seen.slot
        raise DeviceError(self.name, f"slot {slot} not centred after {self.max_corrections} corrections "
                          f"(camera sees slot {seen.slot}, {seen.offset_mm:+.3f} mm off the beam axis)")

    async def feed(self, n: int = 1) -> TapeState:
        return await self.goto(self._slot + n)

    async def rewind(self, n: int = 1) -> TapeState:
        return await self.feed(-n)

    # -- how -------------------------------------------------------------------------------
    async def _ensure_tension(self) -> None:
        t = self.tension_cal
        grams = await self.tension()
        if t.low_g <= grams <= t.high_g:
            return
        if grams > t.high_g:
            raise DeviceError(self.name, f"tape tension {grams:.0f} g above {t.high_g:.0f} g at rest: "
                              "the tape is caught; free it, then retry", ERR_JAMMED)
        # Slack: pull tape into both sides, a few pinch-roller millimetres at a time.
        for _ in range(5):
            steps = round(1.0 / MM_PER_USTEP)
            await self._ask(CMD_STEP_TAPE, "byte uint32 uint32 float byte", TENSION, steps, steps, 0.2,
                            ST_OPTS_WAIT, deadline_s=self.timeout_s + 0.2)
            grams = await self.tension()
            if t.low_g <= grams <= t.high_g:
                self.notice(f"the tape was slack; tensioned to {grams:.0f} g")
                return
        raise DeviceError(self.name, f"tape still slack ({grams:.0f} g, want {t.low_g:.0f}-{t.high_g:.0f} g) "
                          "after tensioning: is it broken?", ERR_JAMMED)

    async def _step(self, mm: float, target: int) -> None:
        steps = round(abs(mm) / MM_PER_USTEP)
        if steps == 0:
            return
        seconds = max(abs(mm) / self.speed_mm_s, 0.02)
        direction = COLLECT if mm > 0 else DISPENSE
        self._readout(target, True)
        try:
            got = await self._ask(CMD_STEP_TAPE, "byte uint32 uint32 float byte", direction, steps, steps,
                                  seconds, ST_OPTS_WAIT | ST_OPTS_WATCH | ST_OPTS_RUN_REELS,
                                  deadline_s=min(seconds + self.timeout_s, self.move_timeout_s))
        except DeviceError as exc:
            if exc.code == ERR_TENSION:
                self._jammed = True
                words = [await self.drive_status(d) for d in (FEED_PINCH, PICKUP_PINCH)]
                faults = sorted({f for w in words for f in status_faults(w)})
                raise DeviceError(self.name, f"tape jammed moving from slot {self._slot} to slot {target}: "
                                  f"{exc.text}" + (f" (drives: {', '.join(faults)})" if faults else "")
                                  + "; clear the jam, then retry", ERR_JAMMED) from exc
            raise
        log.debug("step %+.3f mm done, tension %.0f g", mm, self.tension_cal.grams(int(got.take("int32"))))

    def _readout(self, target: int, moving: bool) -> None:
        if self.on_readout is not None:
            self.on_readout({"slot": self._slot, "state": "MOVING" if moving else "IDLE",
                             "target_slot": target}, moving)

