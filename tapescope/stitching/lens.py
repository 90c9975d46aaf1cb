"""Lens distortion: a radial model of the camera, q -> q + D(q).

Convention (the one the synthetic sets and the solve share): camera pixel q = (y, x) of a
tile at top-left position p sees the specimen at p + q + D(q), with

    D(q) = (k1 * rho^2 + k2 * rho^4) * (q - c),   rho = |q - c| / R,

c the sensor centre and R the half-width of the sensor. k1 > 0 is barrel-like in the sense
that corners see further out than a perfect lens would show them. D is zero at the centre,
so a tile's position is still the position of its centre pixel minus the centre offset.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RadialDistortion:
    k1: float = 0.0
    k2: float = 0.0

    @property
    def is_identity(self) -> bool:
        return self.k1 == 0.0 and self.k2 == 0.0

    def basis(self, q: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """(..., 2, 2) array: the displacement at points q (..., 2) per unit k1 and per unit k2."""
        return radial_basis(q, shape)

    def at(self, q: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """Displacement D(q) at points q (..., 2) in pixels of a tile of `shape`."""
        b = radial_basis(np.asarray(q, float), shape)
        return b[..., 0] * self.k1 + b[..., 1] * self.k2

    def displacement(self, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(dy, dx) fields of D over every pixel of a tile of `shape`."""
        if self.is_identity:
            return np.zeros(shape), np.zeros(shape)
        q = np.stack(np.mgrid[0:shape[0], 0:shape[1]], -1).astype(float)
        d = self.at(q, shape)
        return d[..., 0], d[..., 1]


def radial_basis(q: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    c = (np.array(shape, float) - 1) / 2
    r_norm = max(shape) / 2
    v = q - c
    rho2 = (v**2).sum(-1, keepdims=True) / r_norm**2
    return np.stack([rho2 * v, rho2**2 * v], -1)
