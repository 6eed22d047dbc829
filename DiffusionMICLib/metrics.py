"""Image-quality and segmentation metrics, computed with MONAI inside an optional mask."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from monai.metrics import SSIMMetric

from .engine.inference import bounding_box
from .errors import DiffusionMICError
from .volume import Volume


def _check_grid(pred: Volume, ref: Volume, mask: Volume | None) -> None:
    for name, v in (("reference", ref), ("mask", mask)):
        if v is not None and not v.geometry.same_as(pred.geometry, tol=1e-3):
            raise DiffusionMICError(f"the {name} is not on the prediction's voxel grid")


def image_metrics(pred: Volume, ref: Volume, mask: Volume | None = None) -> dict[str, Any]:
    """RMSE, NMAE, PSNR and SSIM of pred against ref, inside mask (default: everywhere).

    PSNR uses the reference's range inside the mask as peak; NMAE is the mean absolute error
    over that range; SSIM (MONAI, 3D, 7-voxel Gaussian window) is computed on the mask's
    bounding box.
    """
    _check_grid(pred, ref, mask)
    p = pred.array.astype(np.float64)
    r = ref.array.astype(np.float64)
    m = np.ones(r.shape, bool) if mask is None else mask.array > 0
    if not m.any():
        raise DiffusionMICError("the mask is empty")
    diff = p[m] - r[m]
    data_range = float(r[m].max() - r[m].min()) or 1.0
    rmse = float(np.sqrt(np.mean(diff**2)))
    box = bounding_box(m, margin=0)
    pt = torch.from_numpy(p[box]).float()[None, None]
    rt = torch.from_numpy(r[box]).float()[None, None]
    win = min(7, *[s for s in rt.shape[2:]])
    win = win if win % 2 else win - 1
    ssim = SSIMMetric(spatial_dims=3, data_range=data_range, win_size=max(win, 1))(pt, rt)
    return {
        "rmse": rmse,
        "nmae": float(np.mean(np.abs(diff)) / data_range),
        "psnr": float(20 * np.log10(data_range / max(rmse, 1e-12))),
        "ssim": float(ssim.mean()),
        "voxels": int(m.sum()),
    }
