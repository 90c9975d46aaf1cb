"""Montage rendering, the canvas, the OME-Zarr volume and the warps (section-to-section
alignment is `tapescope.alignment`)."""
