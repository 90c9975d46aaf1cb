"""Defocus blur that changes continuously with defocus, however small.

A TEM's image of a stained section loses its finest detail smoothly as the specimen leaves
focus. A sampled Gaussian kernel cannot show blur below about 0.5 px (its taps round to the
identity), so an autofocus could not be measured to better than a few hundred nanometres.
Below ``SAMPLED_FROM_PX`` the blur is built from three-tap kernels whose variance adds up to
sigma^2 exactly (their cascade tends to the Gaussian); above it, OpenCV's Gaussian.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

SAMPLED_FROM_PX = 0.8
_STEP_VAR = 0.25            # each three-tap pass adds at most this variance (its taps stay >= 0.5)


def blur(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """``image`` (float32) blurred by a Gaussian of ``sigma_px``, continuous in sigma from 0."""
    if sigma_px <= 0:
        return image
    if sigma_px >= SAMPLED_FROM_PX:
        return cv2.GaussianBlur(image, (0, 0), sigma_px)
    var = sigma_px * sigma_px
    passes = math.ceil(var / _STEP_VAR)
    v = var / passes
    k = np.array([v / 2, 1 - v, v / 2], np.float32)
    out = image
    for _ in range(passes):
        out = cv2.sepFilter2D(out, -1, k, k, borderType=cv2.BORDER_REFLECT)
    return out
