"""Multi-octave simplex noise in torch: seeded, batched, 2D or 3D, on any device.

AnoDDPM (Wyatt et al., CVPR-W 2022) replaces the Gaussian noise of the forward process with
simplex noise: its low-frequency blobs wash out whole lesions that white noise only speckles,
so the model "repairs" them and they stand out in |input - reconstruction|.

`simplex_noise(shape, generator)` gives a (B, C, *spatial) tensor; spatial is (y, x) or
(z, y, x). Every (item, channel) gets its own field: Gustavson's simplex noise with a
permutation table and lattice offsets drawn from the (CPU) generator, so a seed gives the same
noise on every device. Octave k is sampled at `frequency * 2**k` lattice cells per voxel with
amplitude `persistence**k` (octave 0 is the coarsest: features about 1/frequency voxels wide;
more octaves add finer detail). Each field is then normalised to zero mean and unit standard
deviation, as the diffusion forward process expects of its noise.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable

import torch

from ..errors import DiffusionMICError

Noise = Callable[[tuple[int, ...], torch.Generator], torch.Tensor]

PERIOD = 256                 # lattice period of the permutation hash
DEFAULTS = {"frequency": 1 / 16, "octaves": 4, "persistence": 0.8}

_GRAD3 = torch.tensor([[1, 1, 0], [-1, 1, 0], [1, -1, 0], [-1, -1, 0], [1, 0, 1], [-1, 0, 1],
                       [1, 0, -1], [-1, 0, -1], [0, 1, 1], [0, -1, 1], [0, 1, -1], [0, -1, -1]],
                      dtype=torch.float32)
_ANGLES = torch.arange(8, dtype=torch.float64) * math.pi / 4 + math.pi / 8
_GRAD2 = torch.stack([torch.cos(_ANGLES), torch.sin(_ANGLES)], dim=1).float()


def _hash(perm: torch.Tensor, *idx: torch.Tensor) -> torch.Tensor:
    """perm[(i + perm[(j + perm[k]) & 255]) & 255]: a lattice point's gradient index."""
    h = perm[idx[-1] & (PERIOD - 1)]
    for i in reversed(idx[:-1]):
        h = perm[(i + h) & (PERIOD - 1)]
    return h


def simplex2(x: torch.Tensor, y: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """2D simplex noise at points (x, y) (broadcast), about in [-1, 1]."""
    f2, g2 = 0.5 * (math.sqrt(3.0) - 1.0), (3.0 - math.sqrt(3.0)) / 6.0
    s = (x + y) * f2
    i, j = torch.floor(x + s), torch.floor(y + s)
    t = (i + j) * g2
    x0, y0 = x - (i - t), y - (j - t)
    i1 = (x0 > y0).to(x.dtype)
    j1 = 1.0 - i1
    corners = [(x0, y0, 0, 0), (x0 - i1 + g2, y0 - j1 + g2, i1, j1),
               (x0 - 1.0 + 2.0 * g2, y0 - 1.0 + 2.0 * g2, 1, 1)]
    grads = _GRAD2.to(x.device)
    ii, jj = i.long(), j.long()
    total = torch.zeros_like(x0)
    for cx, cy, di, dj in corners:
        di = di.long() if torch.is_tensor(di) else di
        dj = dj.long() if torch.is_tensor(dj) else dj
        g = grads[_hash(perm, ii + di, jj + dj) % len(grads)]
        r = torch.clamp(0.5 - cx * cx - cy * cy, min=0.0)
        total = total + r**4 * (g[..., 0] * cx + g[..., 1] * cy)
    return 70.0 * total


def simplex3(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """3D simplex noise at points (x, y, z) (broadcast), about in [-1, 1]."""
    f3, g3 = 1.0 / 3.0, 1.0 / 6.0
    s = (x + y + z) * f3
    i, j, k = torch.floor(x + s), torch.floor(y + s), torch.floor(z + s)
    t = (i + j + k) * g3
    x0, y0, z0 = x - (i - t), y - (j - t), z - (k - t)
    # which of the six tetrahedra of the skewed cube the point is in (Gustavson's ordering)
    c1, c2, c3 = x0 >= y0, y0 >= z0, x0 >= z0
    xyz, xzy, zxy = c1 & c2, c1 & ~c2 & c3, c1 & ~c2 & ~c3
    zyx, yzx, yxz = ~c1 & ~c2, ~c1 & c2 & ~c3, ~c1 & c2 & c3
    i1, j1, k1 = xyz | xzy, yzx | yxz, zxy | zyx
    i2, j2, k2 = xyz | xzy | zxy | yxz, xyz | zyx | yzx | yxz, xzy | zxy | zyx | yzx
    offsets = [(0, 0, 0), (i1, j1, k1), (i2, j2, k2), (1, 1, 1)]
    grads = _GRAD3.to(x.device)
    ii, jj, kk = i.long(), j.long(), k.long()
    total = torch.zeros_like(x0)
    for n, (di, dj, dk) in enumerate(offsets):
        di, dj, dk = (d.long() if torch.is_tensor(d) else d for d in (di, dj, dk))
        cx = x0 - di + n * g3
        cy = y0 - dj + n * g3
        cz = z0 - dk + n * g3
        g = grads[_hash(perm, ii + di, jj + dj, kk + dk) % len(grads)]
        r = torch.clamp(0.6 - cx * cx - cy * cy - cz * cz, min=0.0)
        total = total + r**4 * (g[..., 0] * cx + g[..., 1] * cy + g[..., 2] * cz)
    return 32.0 * total


def simplex_noise(shape: tuple[int, ...], generator: torch.Generator | None = None, *,
                  frequency: float = DEFAULTS["frequency"], octaves: int = DEFAULTS["octaves"],
                  persistence: float = DEFAULTS["persistence"], device: torch.device | str | None = None,
                  normalise: bool = True) -> torch.Tensor:
    """Multi-octave simplex noise of `shape` (B, C, *spatial), spatial 2D or 3D; float32.

    Drawn from `generator` (CPU; a fresh permutation table and random lattice offsets per call),
    computed on `device`. With `normalise`, every (item, channel) field has mean 0 and std 1.
    """
    dims = len(shape) - 2
    if dims not in (2, 3):
        raise DiffusionMICError(f"simplex noise needs a (B, C, y, x) or (B, C, z, y, x) shape, got {tuple(shape)}")
    if frequency <= 0 or octaves < 1 or persistence <= 0:
        raise DiffusionMICError("simplex noise needs frequency > 0, octaves >= 1 and persistence > 0")
    device = torch.device(device) if device is not None else torch.device("cpu")
    n = shape[0] * shape[1]
    spatial = shape[2:]
    perm = torch.randperm(PERIOD, generator=generator).to(device)
    # per field and octave, per axis: a random start inside the lattice period
    starts = (torch.rand((int(octaves), n, dims), generator=generator, dtype=torch.float32) * PERIOD)
    axes = [torch.arange(s, dtype=torch.float32, device=device) for s in spatial]
    out = torch.zeros((n, *spatial), dtype=torch.float32, device=device)
    amplitude, f = 1.0, float(frequency)
    view = [(n, *[s if a == d else 1 for a in range(dims)]) for d, s in enumerate(spatial)]
    for k in range(int(octaves)):
        # axis d of the array is coordinate (dims - 1 - d): x is the last array axis
        coords = [(axes[d] * f).view(1, *view[d][1:]) + starts[k, :, d].to(device).view(n, *[1] * dims)
                  for d in range(dims)]
        field = simplex2(coords[1], coords[0], perm) if dims == 2 else simplex3(coords[2], coords[1], coords[0], perm)
        out += (amplitude * field).float()
        amplitude *= persistence
        f *= 2.0
    if normalise:
        flat = out.view(n, -1)
        mean = flat.mean(dim=1, keepdim=True)
        std = flat.std(dim=1, keepdim=True).clamp_min(1e-6)
        out = ((flat - mean) / std).view(n, *spatial)
    return out.view(*shape)


def noise_from_spec(spec: dict[str, Any] | None, device: torch.device | str | None = None) -> Noise | None:
    """The noise a card asks for: {"type": "simplex", frequency, octaves, persistence} or Gaussian (None)."""
    spec = dict(spec or {})
    kind = spec.pop("type", "gaussian")
    if kind == "gaussian":
        return None
    if kind != "simplex":
        raise DiffusionMICError(f"unknown noise type {kind!r}; use 'simplex' or 'gaussian'")
    unknown = set(spec) - set(DEFAULTS)
    if unknown:
        raise DiffusionMICError(f"unknown simplex noise settings: {', '.join(sorted(unknown))}")
    return partial(simplex_noise, **{**DEFAULTS, **spec}, device=device)
