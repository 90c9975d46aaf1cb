"""Where the per-pixel warping runs: OpenCV on the CPU, or CuPy on a GPU.

`render.py` works out which tile draws which pixels and from where (small host arrays, and
the coordinate maps, made on the host either way: the field's bicubic and the lens map are
OpenCV's). A Warp does the per-pixel work: pull a crop through the maps bilinearly, zero
outside it, and blend. `CvWarp` is cv2.remap (exact weights on one-channel float32 in
OpenCV 5).
`NdimageWarp` is `map_coordinates` of scipy or cupyx (order 1, mode 'grid-constant':
zeros interpolated in at the edge, as OpenCV's constant border does) on the array module
it is given: CuPy on a GPU, or NumPy, which runs the same code where there is no GPU (the
tests do). The two agree to within 1/100 px of placement (tested; measured 1/300).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import Any, Protocol

import cv2
import numpy as np

from .array_backend import array_module, to_numpy
from .transform import affine_maps

Index = tuple[slice, slice]


class Warp(Protocol):
    name: str

    def draw(self, crop: np.ndarray, mx: np.ndarray, my: np.ndarray, dst: np.ndarray) -> None:
        """dst (host) = crop pulled through the maps."""

    def sums(self, image: np.ndarray, cover: np.ndarray) -> tuple[Any, Any]:
        """Zeroed float32 accumulators (weighted image, weight) where this warp works, for
        the output views image and cover (host, float32): the views themselves on the host."""

    def add_pulled(self, acc: Any, wsum: Any, at: Index, crop: np.ndarray, wt: np.ndarray,
                   mx: np.ndarray, my: np.ndarray) -> None:
        """acc[at] += crop and wsum[at] += wt, each pulled through the same maps."""

    def finish(self, acc: Any, wsum: Any, image: np.ndarray, cover: np.ndarray) -> None:
        """image = acc / max(wsum, MIN_WEIGHT) (0 where no tile lands), cover = wsum."""

    def draw_affine(self, crop: np.ndarray, m: np.ndarray, dst: np.ndarray) -> None:
        """`draw` where the maps are an affine: m (2 x 3) takes dst's (x, y) to the crop's."""

    def add_pulled_affine(self, acc: Any, wsum: Any, at: Index, crop: np.ndarray, wt: np.ndarray,
                          m: np.ndarray) -> None:
        """`add_pulled` where the maps are an affine: m takes (x, y) of acc[at] to the crop's."""


# The blend's image is its weighted sum over max(weight, this): where no tile lands both are 0
# and so is the image, with no mask to build and apply (a third of a blend's divide time).
MIN_WEIGHT = 1e-6


class CvWarp:
    name = "opencv"

    def draw(self, crop: np.ndarray, mx: np.ndarray, my: np.ndarray, dst: np.ndarray) -> None:
        cv2.remap(crop, mx, my, cv2.INTER_LINEAR, dst=dst, borderMode=cv2.BORDER_CONSTANT)

    def sums(self, image: np.ndarray, cover: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        image.fill(0)
        cover.fill(0)
        return image, cover

    def add_pulled(self, acc: np.ndarray, wsum: np.ndarray, at: Index, crop: np.ndarray, wt: np.ndarray,
                   mx: np.ndarray, my: np.ndarray) -> None:
        acc[at] += cv2.remap(crop, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        wsum[at] += cv2.remap(wt, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)

    def finish(self, acc: np.ndarray, wsum: np.ndarray, image: np.ndarray, cover: np.ndarray) -> None:
        # acc and wsum are image and cover (sums): divided in place.
        cv2.divide(acc, cv2.max(wsum, MIN_WEIGHT), dst=image)

    # OpenCV computes an affine's coordinates itself, fixed-point to 1/1024 px, a third of
    # the time of making the maps and pulling through them (measured on 1 Mpx regions).
    def draw_affine(self, crop: np.ndarray, m: np.ndarray, dst: np.ndarray) -> None:
        cv2.warpAffine(crop, m, (dst.shape[1], dst.shape[0]), dst=dst,
                       flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT)

    def add_pulled_affine(self, acc: np.ndarray, wsum: np.ndarray, at: Index, crop: np.ndarray, wt: np.ndarray,
                          m: np.ndarray) -> None:
        size = (at[1].stop - at[1].start, at[0].stop - at[0].start)
        flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
        acc[at] += cv2.warpAffine(crop, m, size, flags=flags, borderMode=cv2.BORDER_CONSTANT)
        wsum[at] += cv2.warpAffine(wt, m, size, flags=flags, borderMode=cv2.BORDER_CONSTANT)


class NdimageWarp:
    def __init__(self, xp: ModuleType) -> None:
        self.xp = xp
        if xp is np:
            import scipy.ndimage as ndi
        else:  # pragma: no cover - runs where CuPy sees a GPU
            import cupyx.scipy.ndimage as ndi  # type: ignore[import-not-found]
        self.ndi = ndi
        self.name = f"ndimage ({xp.__name__})"

    def _coords(self, mx: np.ndarray, my: np.ndarray) -> Any:
        """The maps where this warp works, in map_coordinates' (row, column) order."""
        xp = self.xp
        return xp.stack([xp.asarray(my, xp.float32), xp.asarray(mx, xp.float32)])

    def _pull(self, src: np.ndarray, coords: Any) -> Any:
        xp = self.xp
        return self.ndi.map_coordinates(xp.asarray(src, xp.float32), coords, order=1, mode="grid-constant",
                                        cval=0.0, output=xp.float32)

    def draw(self, crop: np.ndarray, mx: np.ndarray, my: np.ndarray, dst: np.ndarray) -> None:
        dst[...] = to_numpy(self._pull(crop, self._coords(mx, my)))

    def sums(self, image: np.ndarray, cover: np.ndarray) -> tuple[Any, Any]:
        return self.xp.zeros(image.shape, self.xp.float32), self.xp.zeros(image.shape, self.xp.float32)

    def add_pulled(self, acc: Any, wsum: Any, at: Index, crop: np.ndarray, wt: np.ndarray,
                   mx: np.ndarray, my: np.ndarray) -> None:
        coords = self._coords(mx, my)      # sent to the device once for both
        acc[at] += self._pull(crop, coords)
        wsum[at] += self._pull(wt, coords)

    def draw_affine(self, crop: np.ndarray, m: np.ndarray, dst: np.ndarray) -> None:
        self.draw(crop, *affine_maps(m, (0, 0, *dst.shape)), dst)

    def add_pulled_affine(self, acc: Any, wsum: Any, at: Index, crop: np.ndarray, wt: np.ndarray,
                          m: np.ndarray) -> None:
        block = (0, 0, at[0].stop - at[0].start, at[1].stop - at[1].start)
        self.add_pulled(acc, wsum, at, crop, wt, *affine_maps(m, block))

    def finish(self, acc: Any, wsum: Any, image: np.ndarray, cover: np.ndarray) -> None:
        xp = self.xp
        image[...] = to_numpy(acc / xp.maximum(wsum, xp.float32(MIN_WEIGHT)))
        cover[...] = to_numpy(wsum)


_pool_lock = threading.Lock()
_pool_holders = 0
_pool_before = 1


@contextlib.contextmanager
def one_opencv_thread() -> Iterator[None]:
    """OpenCV's own thread pool held at one thread while renders run, restored when the last
    one in the process ends. A render is parallel across its write units (threads of its
    own); OpenCV splitting every warp over the cores as well only adds its pool's waiting
    (docs/montage.md, "Threads")."""
    global _pool_holders, _pool_before
    with _pool_lock:
        if _pool_holders == 0:
            _pool_before = cv2.getNumThreads()
            cv2.setNumThreads(1)
        _pool_holders += 1
    try:
        yield
    finally:
        with _pool_lock:
            _pool_holders -= 1
            if _pool_holders == 0:
                cv2.setNumThreads(_pool_before)


def warp_for(device: str = "cpu") -> Warp:
    """OpenCV for 'cpu' (and 'auto' without a GPU); CuPy's map_coordinates on a GPU."""
    xp = array_module(device)
    return CvWarp() if xp is np else NdimageWarp(xp)
