"""Montage rendering, section-to-section alignment and the OME-Zarr volume."""
