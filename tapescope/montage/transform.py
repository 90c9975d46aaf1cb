"""Per-section transforms: an affine plus a smooth displacement field on a coarse grid.

A `SectionTransform` maps a pixel p of the output (aligned) canvas to the place in the
section's own, unaligned image that is drawn there: ``src(p) = A @ [p, 1] + f(p)``.
Rendering pulls every output pixel from ``src(p)``, so a section is interpolated once, and
the transform is small enough (an affine and a field with one node per `stride` pixels)
to be stored beside the volume and used to render the section again.

Coordinates follow OpenCV: x first. `matrix` is 2x3 over (x, y, 1); `field` has shape
(gh, gw, 2) with the last axis (dx, dy), node (i, j) sitting at output pixel
(x, y) = (j * stride, i * stride). Keeping OpenCV's order here means the maps go to
`cv2.remap` and `cv2.warpAffine` without swapping axes on every call.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np


def _as3(m: np.ndarray) -> np.ndarray:
    return np.vstack([np.asarray(m, np.float64), [0.0, 0.0, 1.0]])


def affine_maps(matrix: np.ndarray, block: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """float32 maps (x, y) of the 2 x 3 affine `matrix` (output (x, y) -> source) over the
    output block (y0, x0, h, w)."""
    y0, x0, h, w = block
    xs = np.arange(x0, x0 + w, dtype=np.float64)
    ys = np.arange(y0, y0 + h, dtype=np.float64)
    m = np.asarray(matrix, np.float64)
    # Row and column terms in float64, one float32 broadcast add for the block: exact to
    # float32 and four times faster than the whole block in float64.
    mx = (m[0, 0] * xs)[None, :].astype(np.float32) + (m[0, 1] * ys + m[0, 2])[:, None].astype(np.float32)
    my = (m[1, 0] * xs)[None, :].astype(np.float32) + (m[1, 1] * ys + m[1, 2])[:, None].astype(np.float32)
    return mx, my


@dataclass
class SectionTransform:
    matrix: np.ndarray                 # 2x3, output (x, y, 1) -> source (x, y)
    field: np.ndarray | None = None    # (gh, gw, 2) float32 (dx, dy) added after the affine
    stride: int = 64

    @classmethod
    def identity(cls) -> SectionTransform:
        return cls(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))

    @classmethod
    def translation(cls, dy: float, dx: float) -> SectionTransform:
        return cls(np.array([[1.0, 0.0, dx], [0.0, 1.0, dy]]))

    @staticmethod
    def grid_shape(shape: tuple[int, int], stride: int) -> tuple[int, int]:
        """Field nodes needed to cover an output of `shape` (y, x), edges included."""
        return -(-shape[0] // stride) + 1, -(-shape[1] // stride) + 1

    def shifted(self, dy: float, dx: float) -> SectionTransform:
        """The same transform followed by a translation of the source by (dy, dx)."""
        m = np.array(self.matrix, np.float64)
        m[0, 2] += dx
        m[1, 2] += dy
        return SectionTransform(m, self.field, self.stride)

    @property
    def affine3(self) -> np.ndarray:
        """The affine part as a 3x3 over (x, y, 1)."""
        return _as3(self.matrix)

    @property
    def linear(self) -> np.ndarray:
        return np.asarray(self.matrix, np.float64)[:, :2]

    def field_at(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The displacement field at output points (bicubic between nodes, edges extended)."""
        if self.field is None:
            return np.zeros_like(x, np.float32), np.zeros_like(y, np.float32)
        x = np.asarray(x, np.float32)
        shape, n = x.shape, x.size
        # cv2.remap wants 2D maps under 32767 a side: lay the points out in rows of 4096,
        # so points anywhere are sampled exactly as `block_maps` samples a block.
        rows = -(-n // 4096) if n else 1
        gx = np.zeros(rows * 4096, np.float32)
        gy = np.zeros(rows * 4096, np.float32)
        gx[:n] = x.ravel() / self.stride
        gy[:n] = np.asarray(y, np.float32).ravel() / self.stride
        f = cv2.remap(self.field.astype(np.float32), gx.reshape(rows, 4096), gy.reshape(rows, 4096),
                      cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)
        f = f.reshape(-1, 2)[:n].reshape((*shape, 2))
        return f[..., 0], f[..., 1]

    def apply(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Source coordinates of output points (x, y), any equal shapes, float64."""
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        m = np.asarray(self.matrix, np.float64)
        sx = m[0, 0] * x + m[0, 1] * y + m[0, 2]
        sy = m[1, 0] * x + m[1, 1] * y + m[1, 2]
        if self.field is not None:
            fx, fy = self.field_at(x, y)
            sx = sx + fx
            sy = sy + fy
        return sx, sy

    def output_of(self, sx: np.ndarray, sy: np.ndarray, iterations: int = 12) -> tuple[np.ndarray, np.ndarray]:
        """The output points that `apply` maps onto source points (sx, sy): the inverse, by
        fixed-point iteration on p = A^-1 (s - b - f(p)), which converges while the field
        changes by less than a pixel a pixel (a smooth distortion changes by far less)."""
        sx = np.asarray(sx, np.float64)
        sy = np.asarray(sy, np.float64)
        m = np.asarray(self.matrix, np.float64)
        inv = np.linalg.inv(m[:, :2])
        ux, uy = sx - m[0, 2], sy - m[1, 2]
        x = inv[0, 0] * ux + inv[0, 1] * uy
        y = inv[1, 0] * ux + inv[1, 1] * uy
        if self.field is None:
            return x, y
        for _ in range(iterations):
            fx, fy = self.field_at(x, y)
            vx, vy = ux - fx, uy - fy
            x = inv[0, 0] * vx + inv[0, 1] * vy
            y = inv[1, 0] * vx + inv[1, 1] * vy
        return x, y

    def block_maps(self, y0: int, x0: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """float32 source maps (x, y) of the output block [y0:y0+h, x0:x0+w], for cv2.remap."""
        mx, my = affine_maps(self.matrix, (y0, x0, h, w))
        if self.field is not None:
            xs = np.arange(x0, x0 + w, dtype=np.float64)
            ys = np.arange(y0, y0 + h, dtype=np.float64)
            gx = np.broadcast_to((xs / self.stride).astype(np.float32)[None, :], (h, w))
            gy = np.broadcast_to((ys / self.stride).astype(np.float32)[:, None], (h, w))
            f = cv2.remap(self.field.astype(np.float32), np.ascontiguousarray(gx), np.ascontiguousarray(gy),
                          cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)
            mx += f[..., 0]
            my += f[..., 1]
        return mx, my

    def then(self, outer: SectionTransform, shape: tuple[int, int]) -> SectionTransform:
        """The transform p -> outer(self(p)): self maps output to an intermediate frame,
        `outer` maps that frame on to the source. The field is sampled on self's grid
        (outer's stride when self has none) over an output of `shape` (y, x)."""
        matrix = (_as3(outer.matrix) @ _as3(self.matrix))[:2]
        if self.field is None and outer.field is None:
            return SectionTransform(matrix)
        stride = self.stride if self.field is not None else outer.stride
        gh, gw = self.grid_shape(shape, stride)
        gy, gx = np.mgrid[0:gh, 0:gw].astype(np.float64) * stride
        ix, iy = self.apply(gx, gy)
        sx, sy = outer.apply(ix, iy)
        ax = matrix[0, 0] * gx + matrix[0, 1] * gy + matrix[0, 2]
        ay = matrix[1, 0] * gx + matrix[1, 1] * gy + matrix[1, 2]
        field = np.stack([sx - ax, sy - ay], -1).astype(np.float32)
        return SectionTransform(matrix, field, stride)

    # -- storage beside the volume ------------------------------------------------------
    def save(self, path: str | Path) -> None:
        arrays = {"matrix": np.asarray(self.matrix, np.float64), "stride": np.array(self.stride)}
        if self.field is not None:
            arrays["field"] = self.field.astype(np.float32)
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)  # a crash mid-write never leaves a torn transform

    @classmethod
    def load(cls, path: str | Path) -> SectionTransform:
        with np.load(path) as z:
            field = z["field"] if "field" in z.files else None
            return cls(z["matrix"], field, int(z["stride"]))

    def summary(self) -> dict[str, float | list[list[float]]]:
        """What goes into the volume's attributes: the affine and the field's size."""
        m = np.asarray(self.matrix, np.float64)
        rot = float(np.degrees(np.arctan2(m[1, 0], m[0, 0])))
        mag = float(np.abs(self.field).max()) if self.field is not None and self.field.size else 0.0
        return {"matrix_xy": m.round(6).tolist(), "rotation_deg": round(rot, 4),
                "shift_px": [round(float(m[1, 2]), 3), round(float(m[0, 2]), 3)],
                "field_max_px": round(mag, 3), "field_stride_px": self.stride}
