"""Whole volumes through a model: 2D models as batched slices, 3D models by sliding window.

`predict(cond, shape)` is the task's sampler call for one batch: cond is (B, C, *spatial) or
None, and it returns (B, C_out, *spatial). Only the foreground's bounding box is processed;
the rest is filled with the background value.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference

Predict = Callable[[torch.Tensor | None, tuple[int, ...]], torch.Tensor]


def bounding_box(mask: np.ndarray, margin: int = 4) -> tuple[slice, ...]:
    """Slices of the mask's bounding box grown by `margin` voxels (the whole array if empty)."""
    if not mask.any():
        return tuple(slice(0, s) for s in mask.shape)
    idx = np.nonzero(mask)
    return tuple(slice(max(0, int(i.min()) - margin), min(s, int(i.max()) + 1 + margin))
                 for i, s in zip(idx, mask.shape))


def _pad_to(x: torch.Tensor, factor: int, dims: int, value: float) -> tuple[torch.Tensor, list[int]]:
    sizes = list(x.shape[-dims:])
    padded = [math.ceil(s / factor) * factor for s in sizes]
    pad = []
    for s, p in zip(reversed(sizes), reversed(padded)):
        pad += [0, p - s]
    return F.pad(x, pad, value=value), sizes


def count_batches(depth: int, batch_size: int) -> int:
    return math.ceil(depth / batch_size)


def windowed(net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, window: tuple[int, ...], *,
             batch_size: int = 32, fill: float = -1.0) -> torch.Tensor:
    """net over x by Gaussian-weighted sliding windows of its training crop (overlap 0.5, MONAI;
    `fill` outside), as nnU-Net infers: a network trained on crops sees crop-sized inputs."""
    return sliding_window_inference(x, window, batch_size, net, overlap=0.5, mode="gaussian", padding_mode="constant",
                                    cval=fill)


def count_windows(shape: tuple[int, ...], patch: tuple[int, ...], overlap: float) -> int:
    n = 1
    for s, p in zip(shape, patch):
        step = max(1, int(p * (1 - overlap)))
        n *= 1 if s <= p else math.ceil((s - p) / step) + 1
    return n


def stack_neighbours(a: np.ndarray, context: int) -> np.ndarray:
    """(C, z, y, x) -> (C * (2 context + 1), z, y, x): each channel followed by copies shifted by
    -context..+context slices along z (edge slices repeated), so that a 2D model sees, at slice z,
    the slices around it as extra channels ("2.5D")."""
    if context == 0:
        return a
    depth = a.shape[1]
    index = np.clip(np.arange(depth)[None, :] + np.arange(-context, context + 1)[:, None], 0, depth - 1)
    return np.ascontiguousarray(a[:, index].reshape(a.shape[0] * (2 * context + 1), *a.shape[1:]))


def infer_slices(predict: Predict, cond: np.ndarray | None, out_channels: int, shape: tuple[int, int, int],
                 *, factor: int, batch_size: int, crop: tuple[slice, ...] | None = None,
                 background: float = -1.0, on_batch: Callable[[], None] | None = None) -> np.ndarray:
    """Run a 2D model over axial slices (array axis 0) in batches; returns (C_out, z, y, x)."""
    out = np.full((out_channels, *shape), background, np.float32)
    crop = crop or tuple(slice(0, s) for s in shape)
    zs, ys, xs = crop
    for z0 in range(zs.start, zs.stop, batch_size):
        z1 = min(z0 + batch_size, zs.stop)
        c = None
        if cond is not None:
            block = torch.from_numpy(np.ascontiguousarray(cond[:, z0:z1, ys, xs])).permute(1, 0, 2, 3)
            c, sizes = _pad_to(block, factor, 2, background)
            pshape = (z1 - z0, out_channels, *c.shape[-2:])
        else:
            sizes = [ys.stop - ys.start, xs.stop - xs.start]
            pshape = (z1 - z0, out_channels, *[math.ceil(s / factor) * factor for s in sizes])
        y = predict(c, pshape).float().cpu()[..., :sizes[0], :sizes[1]]
        out[:, z0:z1, ys, xs] = y.permute(1, 0, 2, 3).numpy()
        if on_batch is not None:
            on_batch()
    return out


def infer_patches(predict: Predict, cond: np.ndarray | None, out_channels: int, shape: tuple[int, int, int],
                  *, factor: int, patch: tuple[int, int, int] | None, batch_size: int = 1,
                  overlap: float = 0.25, crop: tuple[slice, ...] | None = None, background: float = -1.0,
                  on_batch: Callable[[], None] | None = None) -> np.ndarray:
    """Run a 3D model by Gaussian-weighted sliding window (MONAI); returns (C_out, z, y, x)."""
    out = np.full((out_channels, *shape), background, np.float32)
    crop = crop or tuple(slice(0, s) for s in shape)
    region = tuple(s.stop - s.start for s in crop)
    if cond is None:   # unconditional: one window over the (padded) region
        padded = tuple(math.ceil(s / factor) * factor for s in region)
        y = predict(None, (1, out_channels, *padded)).float().cpu()[0]
        out[(slice(None), *crop)] = y[(slice(None), *[slice(0, s) for s in region])].numpy()
        if on_batch is not None:
            on_batch()
        return out
    block = torch.from_numpy(np.ascontiguousarray(cond[(slice(None), *crop)]))[None]
    roi = tuple(patch) if patch else tuple(math.ceil(s / factor) * factor for s in region)

    def window(x: torch.Tensor) -> torch.Tensor:
        y = predict(x, (x.shape[0], out_channels, *x.shape[2:]))
        if on_batch is not None:
            on_batch()
        return y

    y = sliding_window_inference(block, roi, batch_size, window, overlap=overlap, mode="gaussian",
                                 padding_mode="constant", cval=background)
    out[(slice(None), *crop)] = y[0].float().cpu().numpy()
    return out
