"""The noise level of an image, estimated from the image alone.

Immerkaer's (1996) estimator: the 3 x 3 difference-of-Laplacians kernel [[1, -2, 1], [-2, 4, -2],
[1, -2, 1]] cancels signal that is locally linear within each axial slice; on white noise of
standard deviation sigma its response has standard deviation 6 sigma. Taken robustly (1.4826 x
the median absolute deviation) over the foreground, so that edges and the Rician background do
not count. scikit-image's wavelet estimator (`estimate_sigma`) would need PyWavelets at run time,
and it works on the whole slice, background included."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from .space import foreground

KERNEL = np.array([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]], np.float32)


def estimate_sigma(array: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Standard deviation of the (near-Gaussian) noise of a (z, y, x) or (y, x) image, in its units,
    over `mask` (default: its Otsu foreground, eroded by one voxel in-plane)."""
    a = np.asarray(array, np.float32)
    a = a[None] if a.ndim == 2 else a
    if mask is None:
        mask = foreground(a)
        mask = ndimage.binary_erosion(mask, np.ones((1, 3, 3), bool)) if mask.sum() > 100 else mask
    mask = np.asarray(mask, bool).reshape(a.shape)
    response = ndimage.convolve(a, KERNEL[None], mode="reflect")[mask]
    if response.size < 10:
        return 0.0
    return float(1.4826 * np.median(np.abs(response - np.median(response))) / 6.0)
