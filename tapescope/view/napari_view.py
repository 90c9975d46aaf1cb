"""Open a volume in napari: every pyramid level as one multiscale image, in nanometres, at
the volume's contrast window. napari is an optional dependency (it needs a display)."""

from __future__ import annotations

from pathlib import Path

from .state import ViewError, open_volume, window_of


def open_in_napari(volume_path: Path) -> None:
    """Show the volume and run napari's event loop until its window is closed."""
    volume = open_volume(volume_path)
    try:
        import napari
    except ImportError:
        raise ViewError("--napari needs napari (pip install 'napari[pyqt5]'); without it, "
                        "tapescope view serves the volume to Neuroglancer") from None
    ms = volume.group.attrs["ome"]["multiscales"][0]
    tz, ty, tx = ms["datasets"][0]["coordinateTransformations"][0]["scale"]
    lo, hi = window_of(volume)
    viewer = napari.Viewer(title=f"tapescope: {volume_path}")
    # zarr arrays as they are: napari reads the chunks it shows, the volume is never loaded.
    viewer.add_image(volume.levels, multiscale=True, name=volume_path.stem, contrast_limits=[lo, hi],
                     scale=(tz, ty, tx), colormap="gray")
    viewer.scale_bar.visible = True
    viewer.scale_bar.unit = "nm"
    napari.run()
