"""The simulated world's parameters: specimen, camera, stage, tape and column physics."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorldParams:
    seed: int = 1
    n_slots: int = 16
    tile_px: tuple[int, int] = (512, 512)      # camera sensor (height, width)
    pixel_nm: float = 4.0                      # at imaging_mag
    section_px: tuple[int, int] = (2048, 2048)  # specimen extent of each section at pixel_nm
    thickness_nm: float = 40.0
    # Tape: where each aperture lands (position error) and where its section lies.
    slot_offset_sigma_nm: float = 200.0        # section centre relative to the beam axis
    slot_rotation_sigma_deg: float = 2.0       # section rotation on its slot, degrees
    tape_position_sigma_nm: float = 300.0      # aperture centre relative to the beam axis
    aperture_scale: float = 1.6                # aperture size / section size (GridTape: ~1.5-2)
    aperture_corner: float = 0.15              # corner radius / aperture short side
    intact_slots: int = 3                      # slots 0..n-1 always hold undamaged tissue
    p_empty: float = 0.08                      # chances for each later slot
    p_fold: float = 0.10
    p_tear: float = 0.10
    p_resin: float = 0.15
    # Stage physics.
    stage_error_sigma_nm: float = 24.0         # repeatability: ~6 px at 4 nm/px
    stage_backlash_nm: float = 12.0            # lost motion when an axis reverses
    stage_speed_nm_s: float = 2.0e6
    stage_accel_nm_s2: float = 2.0e8
    stage_settle_s: float = 0.01
    stage_limits_nm: float = 2.0e7             # hardware limit switches at +-this on each axis
    # Tape transport.
    tape_s_per_slot: float = 0.02
    tape_tension_g: float = 80.0
    tape_slot_pitch_mm: float = 6.0             # GridTape: slot centres along the tape
    # Column.
    imaging_mag: float = 4800.0                # the magnification at which pixel_nm holds
    magnifications: tuple[float, ...] = (150.0, 300.0, 600.0, 1200.0, 2400.0, 4800.0, 9600.0)
    ht_kv: float = 120.0
    ht_ramp_s: float = 0.05
    focus_offset_sigma_nm: float = 300.0       # each section's true focus (tape height)
    focus_drift_nm: float = 200.0              # amplitude of the slow drift of true focus
    focus_drift_period_s: float = 900.0
    defocus_blur: float = 0.004                # blur sigma (nm) per nm of defocus
    # Camera.
    electrons_per_ms: float = 100.0            # at full transmission and gain 1
    counts_per_electron: float = 4.0
    dark_offset: float = 100.0
    read_noise_counts: float = 6.0
    vignetting: float = 0.25                   # relative fall-off at the sensor corner
    lens_distortion_px: float = 1.0            # radial (barrel) shift at the sensor corner
    film_transmission: float = 0.97            # support film / bare resin
    tape_transmission: float = 0.0             # the tape itself is opaque
