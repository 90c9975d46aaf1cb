"""Look at a volume: `tapescope view` serves it with Neuroglancer's own client, or opens napari."""
