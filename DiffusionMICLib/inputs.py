"""A run's input volumes checked against each other and against the model before sampling:
other inputs resampled onto the first one's grid, 2D images only through 2D models, and
intensities compared with the range the model's card says it was trained on."""
from __future__ import annotations

from typing import Any

import numpy as np

from .engine.space import robust_scale, scaled_range
from .errors import DiffusionMICError
from .models import LABEL_INPUT, ModelCard
from .volume import Volume, resample_to

# Cards written before `input_range` existed: magnitude images (MRI) scaled by their robust scale.
FALLBACK_INPUT_RANGE = (0.0, 1.5)
# How far outside the trained range (in widths of that range) an input may go before a warning.
RANGE_TOLERANCE = 0.5
LABEL_VALUES = 255     # an integer volume with at most this many values is taken as a label map


def is_label_map(volume: Volume) -> bool:
    a = volume.array
    if a.dtype.kind not in "biu":
        return False
    sample = a.ravel()[:: max(1, a.size // 100_000)]      # most images show many values at once
    return np.unique(sample).size <= LABEL_VALUES and np.unique(a).size <= LABEL_VALUES


def align_inputs(volumes: list[Volume]) -> tuple[list[Volume], list[dict[str, Any]]]:
    """The inputs with every one after the first resampled in physical space onto the first
    one's grid (linear, nearest for label maps; 0 outside), and a record of each resampling
    ("overlap": the fraction of the first grid's voxels it covers). An input that does not
    overlap the first is refused."""
    if len(volumes) < 2:
        return list(volumes), []
    first = volumes[0].geometry
    aligned, resampled = [volumes[0]], []
    for i, v in enumerate(volumes[1:], 2):
        if v.geometry.same_as(first, tol=1e-3):
            aligned.append(v)
            continue
        covered = resample_to(v.with_array(np.ones(v.array.shape, np.uint8)), first, interpolation="nearest").array
        if not covered.any():
            raise DiffusionMICError(f"input {i} does not overlap input 1 in physical space (size "
                                    f"{'x'.join(map(str, v.size))}, origin {tuple(round(o, 1) for o in v.origin)} mm)")
        interpolation = "nearest" if is_label_map(v) else "linear"
        source = v if interpolation == "nearest" else v.with_array(v.array.astype(np.float32))
        moved = resample_to(source, first, interpolation=interpolation)
        aligned.append(Volume(moved.array, first, volumes[0].planar))
        resampled.append({"input": i, "interpolation": interpolation, "size": list(v.size),
                          "spacing": [round(s, 4) for s in v.spacing], "overlap": round(float(covered.mean()), 4)})
    return aligned, resampled


def check_dimensions(card: ModelCard, volumes: list[Volume]) -> None:
    """A 2D image (one planar slice) needs a model of 2D slices."""
    if volumes and volumes[0].planar and card.spatial_dims != 2:
        raise DiffusionMICError(f"input 1 is a 2D image but model '{card.name}' is a 3D model; use a 2D model")


def intensity_warnings(card: ModelCard, volumes: list[Volume]) -> list[str]:
    """One line per input whose intensities lie far outside the card's `input_range` (both in
    units of the input's robust scale, as the card's normalisation computes it)."""
    lo, hi = card.input_range or FALLBACK_INPUT_RANGE
    margin = RANGE_TOLERANCE * (hi - lo)
    out = []
    for i, v in enumerate(volumes, 1):
        if card.inputs[i - 1:i] == [LABEL_INPUT]:     # a label map: its task checks the labels
            continue
        a = v.array.astype(np.float32)
        scale = robust_scale(a, card.normalisation)
        run_lo, run_hi = scaled_range(a, scale)
        if run_lo < lo - margin or run_hi > hi + margin:
            name = card.inputs[i - 1] if i <= len(card.inputs) else f"input {i}"
            out.append(f"input {i} ({name}): intensities {run_lo:.2f} to {run_hi:.2f} (x its robust scale) lie far "
                       f"outside the {lo:.2f} to {hi:.2f} model '{card.name}' was trained on "
                       f"(another modality or scaling, e.g. CT?); results may be meaningless")
    return out
