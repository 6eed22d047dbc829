"""Moving volumes into a model's space (orientation, spacing, intensity scale) and back.

The inverse always resamples onto the input's own geometry, so outputs land on exactly the
input's voxel grid (size, spacing, origin, direction). When only the orientation differs the
round trip is a pure axis permutation/flip and values are unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from ..errors import DiffusionMICError
from ..volume import Geometry, Volume, acquired_slices, orient, resample_spacing, resample_to

# A card orientation: the input's acquired slices (volume.acquired_slices), not a fixed anatomical plane.
ACQUIRED = "acquired"

def foreground(array: np.ndarray) -> np.ndarray:
    """Otsu foreground (robust to a Rician noise floor); the whole array if Otsu finds nothing."""
    a = np.asarray(array, dtype=np.float32)
    if a.size == 0 or float(a.max()) <= float(a.min()):
        return np.ones(a.shape, bool)
    mask = sitk.GetArrayFromImage(sitk.OtsuThreshold(sitk.GetImageFromArray(a), 0, 1)).astype(bool)
    return mask if mask.any() else np.ones(a.shape, bool)


def robust_scale(array: np.ndarray, normalisation: dict) -> float:
    """The intensity divisor: the card's percentile of the foreground maps to the card's value.

    A median-based scale (percentile 50) barely moves with noise; 99.5 suits clean data.
    """
    if normalisation.get("method", "percentile") != "percentile":
        raise DiffusionMICError(f"unknown normalisation method {normalisation.get('method')!r}")
    a = np.asarray(array, dtype=np.float32)
    scale = float(np.percentile(a[foreground(a)], normalisation.get("percentile", 99.5)))
    scale /= float(normalisation.get("value", 1.0))
    return scale if scale > 0 else 1.0


def scaled_range(array: np.ndarray, scale: float = 1.0) -> tuple[float, float]:
    """The 0.1th and 99.9th percentiles of array / scale: the intensity range a card's
    `input_range` records, in units of the card's robust scale."""
    lo, hi = np.percentile(np.asarray(array, np.float32), (0.1, 99.9)) / scale
    return float(lo), float(hi)


def to_unit(array: np.ndarray, scale: float) -> np.ndarray:
    """Intensities / scale mapped to the diffusion range [-1, 1] (0 -> -1, scale -> 1)."""
    return (np.asarray(array, np.float32) / scale) * 2.0 - 1.0


def from_unit(array: np.ndarray, scale: float = 1.0) -> np.ndarray:
    return ((np.asarray(array, np.float32) + 1.0) / 2.0 * scale).astype(np.float32)


@dataclass
class ModelSpace:
    """Input volumes stacked as channels on the model's grid, with what's needed to go back."""

    arrays: np.ndarray        # (C, z, y, x) float32 in the model's orientation/spacing
    reference: Volume         # one input volume as read (defines the output grid)
    model_grid: Volume        # a volume on the model grid (geometry carrier)

    @classmethod
    def enter(cls, volumes: list[Volume], orientation: str = "RAS",
              spacing: list[float] | None = None) -> "ModelSpace":
        """Reorient (exact; ACQUIRED: the input's acquired slices as axis 0) and, if the card fixes a
        spacing that differs, resample (linear)."""
        if not volumes:
            raise DiffusionMICError("no input volume given")
        first = volumes[0]
        for i, v in enumerate(volumes[1:], 2):
            if not v.geometry.same_as(first.geometry, tol=1e-3):
                raise DiffusionMICError(f"input {i} is not on the same voxel grid as input 1; resample it first")
        moved = []
        for v in volumes:
            m = v.with_array(v.array.astype(np.float32))
            m = acquired_slices(m) if orientation == ACQUIRED else orient(m, orientation)
            if spacing is not None and not np.allclose(m.geometry.spacing, spacing, rtol=1e-3):
                m = resample_spacing(m, tuple(spacing))
            moved.append(m)
        return cls(np.stack([m.array for m in moved]), first, moved[0])

    @classmethod
    def from_grid(cls, geometry: Geometry, channels: int = 0) -> "ModelSpace":
        """An empty model space on a given grid (generation has no input)."""
        size = geometry.size
        vol = Volume(np.zeros(size[::-1], np.float32), geometry)
        return cls(np.zeros((channels, *size[::-1]), np.float32), vol, vol)

    def leave(self, array: np.ndarray, *, interpolation: str = "linear", default: float = 0.0) -> Volume:
        """One (z, y, x) model-space array back onto the input's exact grid."""
        model_vol = self.model_grid.with_array(np.ascontiguousarray(array))
        if model_vol.geometry.same_as(self.reference.geometry, tol=1e-6):
            return model_vol
        return resample_to(model_vol, self.reference.geometry, interpolation=interpolation, default=default)
