"""GridTape's reel controller, emulated: its firmware's comando commands over a pseudo-terminal,
and the tape's physics behind them (pinch and reel drives, load cell, slip, jam, slack).

The model (``GridTapeModel``) knows millimetres of tape, microsteps and load-cell counts; it
knows no slot numbers, as the firmware does not. Slots exist on the tape: slot k's aperture
centre is at k * pitch mm, and the barcode camera (sim_hardware/tape_camera.py) sees which
one is under the beam. The emulator (``GridTapeEmulator``) is the Arduino: one command at a
time, and a ``step_tape`` with the wait option holds the line until the move ends.
"""

from __future__ import annotations

import asyncio
import time

from tapescope.hardware import comando
from tapescope.hardware import gridtape as fw

from .pty_server import Later, PtyServer
from .world import SimWorld

# L6470 status word of a drive that is powered, holding, not busy and has no fault flags:
# the flags are active low (1 = no fault), BUSY too.
STATUS_OK = (fw.ST_BUSY | fw.ST_UVLO | fw.ST_TH_WRN | fw.ST_TH_SD | fw.ST_OCD
             | fw.ST_STEP_LOSS_A | fw.ST_STEP_LOSS_B)
COUNTS_ZERO = 8_457_000          # load-cell reading with no tape tension
COUNTS_PER_G = 100.0
JAM_SURGE_G = 400.0              # what the load cell reads when the pinch drives pull on stuck tape


class GridTapeModel:
    def __init__(self, world: SimWorld) -> None:
        self.world = world
        self.pitch_mm = world.p.tape_slot_pitch_mm
        self.tape_mm = 0.0                    # tape under the beam axis; slot k centred at k * pitch
        self.pinch = {fw.FEED_PINCH: 0, fw.PICKUP_PINCH: 0}      # microsteps, signed
        self.hiz = dict.fromkeys(fw.DRIVES, False)
        self.stalled = dict.fromkeys(fw.DRIVES, False)
        self.speed = dict.fromkeys(fw.DRIVES, 1024.0)
        self.busy_until = 0.0
        self.limits = (8_460_000, 8_470_000)  # the firmware's defaults, counts
        self.led = 255
        self.jammed = False
        self.jam_moves_left = 0
        self.slack = False
        self.mislabel: dict[int, int] = {}    # slot -> the label it wrongly carries
        self._place()

    # -- what the sensors read ------------------------------------------------------------
    def tension_counts(self) -> int:
        w = self.world
        if self.slack:
            grams = 2.0
        elif self.jammed and time.monotonic() < self.busy_until:
            grams = JAM_SURGE_G
        elif self.hiz[fw.FEED_PINCH] or self.hiz[fw.PICKUP_PINCH]:
            grams = 5.0                        # nothing holds the tape (a stuck tape too, until held)
        else:
            grams = w.p.tape_tension_g
        return int(COUNTS_ZERO + grams * COUNTS_PER_G)

    def busy(self) -> bool:
        return time.monotonic() < self.busy_until

    def status(self, drive: int) -> int:
        word = STATUS_OK
        if self.hiz[drive]:
            word |= fw.ST_HIZ
        if self.busy() and drive in self.pinch:
            word &= ~fw.ST_BUSY
        if self.stalled[drive]:
            word &= ~(fw.ST_STEP_LOSS_A | fw.ST_STEP_LOSS_B)
        return word

    def beam_slot(self) -> int:
        return round(self.tape_mm / self.pitch_mm)

    def label(self, slot: int) -> int:
        return self.mislabel.get(slot, slot)

    # -- what the firmware does -------------------------------------------------------------
    def reset_drives(self) -> None:
        """Reconfigure the drivers: fault flags cleared, outputs off until the next move.
        A stuck tape comes free when the drives let go of it."""
        self.hiz = dict.fromkeys(fw.DRIVES, True)
        self.stalled = dict.fromkeys(fw.DRIVES, False)
        self.jammed = False

    def halt_all(self) -> None:
        self.hiz = dict.fromkeys(fw.DRIVES, True)
        self.busy_until = 0.0

    def step(self, direction: int, f_steps: int, p_steps: int, seconds: float) -> float:
        """Start a step_tape; returns when (monotonic) the drives stop."""
        w = self.world
        self.hiz[fw.FEED_PINCH] = self.hiz[fw.PICKUP_PINCH] = False
        self.busy_until = time.monotonic() + max(seconds, 0.0)
        sign = {fw.COLLECT: 1, fw.DISPENSE: -1}.get(direction, 0)
        if direction == fw.TENSION:
            self.slack = False
        elif direction == fw.UNTENSION:
            self.slack = True
        if sign == 0:
            return self.busy_until
        jam = w.faults.take("tape_jam")
        if jam is not None:
            self.jammed = True
            self.jam_moves_left = int(jam["clears_after"])
        if self.jammed:
            self.stalled[fw.FEED_PINCH] = self.stalled[fw.PICKUP_PINCH] = True
            if self.jam_moves_left > 0:       # a jam the tension control works free
                self.jam_moves_left -= 1
                if self.jam_moves_left == 0:
                    self.jammed = False
            return self.busy_until
        self.pinch[fw.FEED_PINCH] += sign * f_steps
        self.pinch[fw.PICKUP_PINCH] += sign * p_steps
        self.tape_mm += sign * min(f_steps, p_steps) * fw.MM_PER_USTEP
        self.mislabel.clear()
        slot = self.beam_slot()
        slip = w.faults.take("tape_slip", slot=slot)
        if slip is not None:
            s = int(slip["slots"])
            self.tape_mm += s * self.pitch_mm
            if not slip["seen"]:
                self.mislabel[slot + s] = slot
        self._place()
        return self.busy_until

    def _place(self) -> None:
        """Tell the shared world which section is under the beam and which label it shows."""
        w = self.world
        beam = min(max(self.beam_slot(), 0), w.p.n_slots - 1)
        label = self.label(beam)
        w.tape.slot, w.tape.slip, w.tape.slip_seen = label, beam - label, label == beam
        w.prefetch(beam)
        w.prefetch(beam + 1)


class GridTapeEmulator(PtyServer):
    name = "tape"

    def __init__(self, world: SimWorld) -> None:
        super().__init__(world.faults)
        self.model = GridTapeModel(world)
        self._deframer = comando.Deframer()
        self._queue: list[bytes] = []
        self._blocked = False               # a waiting step_tape holds the firmware's loop

    def received(self, chunk: bytes) -> None:
        self._queue += self._deframer.feed(chunk)
        self._drain()

    def _drain(self) -> None:
        while self._queue and not self._blocked:
            payload = self._queue.pop(0)
            try:
                cmd = comando.parse_payload(payload)
            except comando.ComandoError:
                continue                    # the firmware ignores what it cannot parse
            name = fw.COMMAND_NAMES.get(cmd.cid, str(cmd.cid))
            self.serve(name, lambda cmd=cmd: self._run(cmd))

    def _reply(self, cid: int, types: str = "", *values: float | int | bool) -> bytes:
        return comando.command(cid, types, *values)

    def _error(self, code: int) -> bytes:
        return self._reply(fw.CMD_ERROR, "byte", code)

    def _run(self, cmd: comando.Command) -> bytes | Later | None:
        m = self.model
        try:
            match cmd.cid:
                case fw.CMD_PING:
                    return self._reply(fw.CMD_PING, "byte", cmd.take("byte") if cmd.has_arg() else 0)
                case fw.CMD_READ_TENSION:
                    if self.faults.take("tape_slack") is not None:
                        m.slack = True
                    return self._reply(fw.CMD_READ_TENSION, "int32", m.tension_counts())
                case fw.CMD_SET_LED:
                    m.led = int(cmd.take("byte"))
                case fw.CMD_RESET_DRIVES:
                    m.reset_drives()
                case fw.CMD_GET_BUSY:
                    return self._reply(fw.CMD_GET_BUSY, "byte", int(m.busy()))
                case fw.CMD_GET_STATUS | fw.CMD_HOLD_DRIVE | fw.CMD_RELEASE_DRIVE | fw.CMD_GET_SPEED \
                        | fw.CMD_SET_SPEED:
                    return self._drive_command(cmd)
                case fw.CMD_STOP_ALL:
                    m.hiz[fw.FEED_REEL] = m.hiz[fw.PICKUP_REEL] = True
                    m.busy_until = 0.0
                case fw.CMD_RELEASE_ALL | fw.CMD_HALT_ALL:
                    m.halt_all()
                case fw.CMD_STOP_REELS:
                    m.hiz[fw.FEED_REEL] = m.hiz[fw.PICKUP_REEL] = True
                case fw.CMD_RUN_REELS:
                    cmd.take("float")
                    m.hiz[fw.FEED_REEL] = m.hiz[fw.PICKUP_REEL] = False
                case fw.CMD_SET_TENSION_LIMITS:
                    low, high = cmd.values("int32 int32")
                    m.limits = (int(low), int(high))
                case fw.CMD_GET_TENSION_LIMITS:
                    return self._reply(fw.CMD_GET_TENSION_LIMITS, "int32 int32", *m.limits)
                case fw.CMD_STEP_TAPE:
                    return self._step_tape(cmd)
                case _:
                    return self._error(fw.ERR_INVALID_CMD)
        except comando.ComandoError:
            return self._error(fw.ERR_MISSING_ARG)
        return None

    def _drive_command(self, cmd: comando.Command) -> bytes | None:
        m = self.model
        drive = int(cmd.take("byte"))
        if drive not in fw.DRIVES:
            return self._error(fw.ERR_INVALID_DRIVE)
        match cmd.cid:
            case fw.CMD_GET_STATUS:
                word = m.status(drive)
                return self._reply(fw.CMD_GET_STATUS, "int16", word - 0x10000 if word & 0x8000 else word)
            case fw.CMD_HOLD_DRIVE:
                m.hiz[drive] = False
            case fw.CMD_RELEASE_DRIVE:
                m.hiz[drive] = True
            case fw.CMD_GET_SPEED:
                return self._reply(fw.CMD_GET_SPEED, "float", m.speed[drive])
            case fw.CMD_SET_SPEED:
                m.speed[drive] = float(cmd.take("float"))
        return None

    def _step_tape(self, cmd: comando.Command) -> bytes | Later | None:
        m = self.model
        direction = int(cmd.take("byte"))
        if direction > fw.UNTENSION:
            return self._error(fw.ERR_INVALID_ARG)
        f_steps, p_steps, seconds, opts = cmd.values("uint32 uint32 float byte")
        low, high = m.limits
        # A tape that is already out of range trips the watch at once, as the firmware's
        # first load-cell read in its wait loop would.
        if opts & fw.ST_OPTS_WATCH and not low <= m.tension_counts() <= high \
                and direction in (fw.COLLECT, fw.DISPENSE):
            m.halt_all()
            return self._error(fw.ERR_TENSION)
        end = m.step(direction, int(f_steps), int(p_steps), float(seconds))
        if not opts & fw.ST_OPTS_WAIT:
            return None
        self._blocked = True
        watch = bool(opts & fw.ST_OPTS_WATCH)
        later = Later()

        def finish() -> None:
            self._blocked = False
            reading = m.tension_counts()
            if watch and (m.jammed or not low <= reading <= high):
                m.halt_all()
                reply = self._error(fw.ERR_TENSION)
            else:
                m.busy_until = 0.0
                reply = self._reply(fw.CMD_STEP_TAPE, "int32", m.tension_counts())
            later.send(reply)
            self._drain()

        # A jam trips the watch as soon as the load cell sees the surge.
        delay = min(0.05, end - time.monotonic()) if watch and m.jammed else end - time.monotonic()
        asyncio.get_running_loop().call_later(max(delay, 0.0), finish)
        return later
