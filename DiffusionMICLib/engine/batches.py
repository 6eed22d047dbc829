"""Random training batches: 2D slices or 3D patches cropped from preloaded model-space arrays."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from .trainer import Batch


@dataclass
class TrainingCase:
    """One case in model space, intensities in [-1, 1]: conditioning, target, class label."""

    target: np.ndarray                 # (C_t, z, y, x)
    cond: np.ndarray | None = None     # (C_c, z, y, x)
    label: int | None = None
    foreground: np.ndarray | None = None   # (z, y, x) bool: where crops are centred
    focus: list[np.ndarray] | None = None  # (N, 3) voxel indices per rare class, for oversampling
    weight: np.ndarray | None = None   # (z, y, x) per-voxel loss weight (None: 1 everywhere)


def whole_crop(shape: tuple[int, ...]) -> np.ndarray:
    """A foreground of one voxel, the centre: a crop of the whole array's size is then never shifted."""
    centre = np.zeros(shape, bool)
    centre[tuple(s // 2 for s in shape)] = True
    return centre


def _crop(a: np.ndarray, starts: list[int], size: list[int], fill: float) -> np.ndarray:
    """Crop (C, *spatial) at starts with size, padding with `fill` where it runs outside."""
    out = np.full((a.shape[0], *size), fill, np.float32)
    src, dst = [slice(None)], [slice(None)]
    for s, n, dim in zip(starts, size, a.shape[1:]):
        lo, hi = max(s, 0), min(s + n, dim)
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[tuple(dst)] = a[tuple(src)]
    return out


def mirror(batch: Batch, generator: torch.Generator) -> Batch:
    """Each crop of the batch flipped along its last axis (left-right in a RAS model space) with probability 1/2,
    its conditioning and loss weight with it."""
    which = torch.rand(batch.target.shape[0], generator=generator) < 0.5

    def mirrored(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        out = t.clone()
        out[which] = out[which].flip(-1)
        return out
    return Batch(mirrored(batch.target), mirrored(batch.cond), batch.labels, mirrored(batch.weight))


def random_batches(cases: list[TrainingCase], *, spatial_dims: int, patch: list[int], batch_size: int,
                   seed: int, background: float = -1.0, focus_fraction: float = 0.0,
                   augment: Callable[[Batch, torch.Generator], Batch] | None = None) -> Iterator[Batch]:
    """Endless batches; each crop is centred on a random foreground voxel of a random case.

    With focus_fraction > 0, that fraction of crops is centred instead on a voxel of one of the
    case's `focus` classes, each class equally likely (nnU-Net's foreground oversampling: small
    structures such as lesions are otherwise almost never seen).

    2D: patch is (y, x) and crops come from axial slices (array axis 0); 3D: patch is (z, y, x).
    """
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    centres = [np.argwhere(c.foreground if c.foreground is not None else np.ones(c.target.shape[1:], bool))
               for c in cases]
    while True:
        targets, conds, labels, weights = [], [], [], []
        for _ in range(batch_size):
            i = int(rng.integers(len(cases)))
            case = cases[i]
            focus = [f for f in case.focus or [] if len(f)]
            pool = focus[rng.integers(len(focus))] if focus and rng.random() < focus_fraction else centres[i]
            z, y, x = pool[rng.integers(len(pool))]
            if spatial_dims == 2:
                starts = [int(y) - patch[0] // 2, int(x) - patch[1] // 2]
                pick = lambda a: _crop(a[:, z], starts, list(patch), background)  # noqa: E731
            else:
                starts = [int(z) - patch[0] // 2, int(y) - patch[1] // 2, int(x) - patch[2] // 2]
                pick = lambda a: _crop(a, starts, list(patch), background)  # noqa: E731
            targets.append(pick(case.target))
            if case.cond is not None:
                conds.append(pick(case.cond))
            if case.label is not None:
                labels.append(case.label)
            if case.weight is not None:
                weights.append(pick(case.weight[None]))
        batch = Batch(torch.from_numpy(np.stack(targets)),
                      torch.from_numpy(np.stack(conds)) if conds else None,
                      torch.tensor(labels, dtype=torch.long) if labels else None,
                      torch.from_numpy(np.stack(weights)) if weights else None)
        yield augment(batch, gen) if augment is not None else batch
