"""BrainWeb-style brain MRI simulator on real anatomy (the MNI ICBM152 2009 tissue maps).

Anatomy: nilearn's MNI ICBM152 2009 grey- and white-matter probability maps and brain mask
(1 mm, shipped inside nilearn, nothing is downloaded); CSF = clip(mask - GM - WM, 0, 1) with
the binary mask smoothed slightly. Every subject is a different warp of that anatomy: a small
random global affine (rotation, anisotropic scale, shift), a radial enlargement or shrinkage
around the ventricles (atrophy-like) and a smooth random displacement field (low-frequency
cosine basis, about 2-3 mm RMS). The 1 mm maps are sampled once, directly onto the output grid,
after a Gaussian pre-filter that turns them into partial-volume fractions of the output voxel.

Output grid (`grid`): one fixed box around the MNI brain (+12 mm each side, rounded up to a
multiple of 16 mm: 176 x 208 x 192 mm) at `resolution` mm isotropic: 88 x 104 x 96 voxels at
2 mm, 176 x 208 x 192 at 1 mm; a 2 mm voxel covers exactly 2 x 2 x 2 template voxels. All
subjects share it. Direction LPS diag(-1, -1, 1), as SimpleITK reads an RAS-identity NIfTI.

Contrast: tissue parameters at 1.5 T (`TISSUES`, jittered per subject: T1/T2 about 4 %, PD
about 3 %, CSF 1 %), intra-tissue texture (smooth random fields modulating T1 and PD of GM,
WM and lesions by about 3 %), partial-volume mixing of the tissue *signals*, then four
sequences (`PROTOCOLS`): spin echo S = PD (1 - exp(-TR/T1)) exp(-TE/T2) for T1w, T2w and PD,
and inversion recovery S = PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2) for FLAIR with TI
chosen to null the nominal CSF. Values are S x 1000 (`SCALE`; PD of water = 1), so brain tissue
lies between about 100 and 750 in every contrast; FLAIR CSF is near 0. One smooth
multiplicative bias field (receive coil, about +-10-20 %) is shared by all four contrasts.

Lesions (MS-like): deformed ellipsoids (1-3 overlapping lobes, 2-12 mm radius, log-uniform)
placed in deep WM (55 %), periventricular (25 %) or juxtacortical (20 %) white matter, each with
its own T1, T2 and PD drawn from its kind's ranges (`LESION_KINDS`); they replace GM/WM (never
CSF) with soft, partial-volume edges. Kinds (`lesion_kind`):
- hyper (label 4, the default): T1 900-1200 ms, T2 140-240 ms, PD 0.85-0.95: hypointense on T1w,
  the brightest brain tissue on T2w-like FLAIR (MS plaques);
- iso (label 5): grey-matter-like tissue inside white matter (heterotopia-like): iso-intense
  to GM in every contrast, so only its place gives it away;
- hypo (label 6): T1 1400-1900 ms, T2 110-150 ms ("black holes"): darker than GM on T1w, darker
  than WM on FLAIR, brighter than WM but darker than CSF on T2w;
- mixed: each lesion is hyper, iso or hypo (equally likely; labels 4, 5, 6);
- tumour: one glioma-like mass in deep white matter instead of the lesions: a solid part
  (label 7, 8-15 mm radius, slightly FLAIR-bright), usually a necrotic core (label 9, CSF-like
  but not nulled on FLAIR) and vasogenic oedema spreading only through the surrounding white
  matter (label 8, bright on T2w/FLAIR), with mass effect: the tissue around it is pushed
  outwards by a smooth radial displacement (up to 0.7 x the radius, decaying over about the
  radius + 8 mm; monotone, so nothing folds). Its `healthy` images are the undeformed anatomy.
With the same seed every kind but tumour puts its lesions in the same places (the kind only
changes their tissue parameters), and hyper reproduces the phantom made before kinds existed.

Noise: Rician, sigma = noise % of the subject's brightest pure-tissue signal in that contrast
(BrainWeb convention): acquired = sqrt((clean + n1)^2 + n2^2), n1, n2 ~ N(0, sigma). Background
is 0 plus the Rician floor.

Everything is drawn from one numpy Generator seeded by the subject seed: same seed, same
subject (at a given resolution; the anatomy, bias field and texture are also the same at
another resolution, the lesion positions and the noise are not).
"""
from __future__ import annotations

import functools
import json
import math
import numbers
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import ndimage

from .errors import DiffusionMICError
from .volume import Geometry, Volume, write_volume

CHANNELS = ("T1", "T2", "PD", "FLAIR")
LABELS = {"background": 0, "CSF": 1, "GM": 2, "WM": 3, "lesion": 4}

# Nominal tissue parameters at 1.5 T (T1, T2 in ms; PD relative to water).
TISSUES = {
    "CSF": {"T1": 2569.0, "T2": 329.0, "PD": 1.00},
    "GM": {"T1": 833.0, "T2": 83.0, "PD": 0.86},
    "WM": {"T1": 500.0, "T2": 70.0, "PD": 0.77},
}
LESION_RANGE = {"T1": (900.0, 1200.0), "T2": (140.0, 240.0), "PD": (0.85, 0.95)}
# Abnormal tissues: label value and (T1, T2, PD) ranges. "lesion" is the hyperintense MS lesion.
ANOMALIES = {
    "lesion": (4, LESION_RANGE),
    "iso-lesion": (5, {"T1": (800.0, 870.0), "T2": (79.0, 88.0), "PD": (0.84, 0.88)}),
    "hypo-lesion": (6, {"T1": (1400.0, 1900.0), "T2": (110.0, 150.0), "PD": (0.86, 0.92)}),
    "tumour": (7, {"T1": (950.0, 1100.0), "T2": (100.0, 120.0), "PD": (0.86, 0.90)}),
    "oedema": (8, {"T1": (850.0, 950.0), "T2": (120.0, 150.0), "PD": (0.84, 0.88)}),
    "necrosis": (9, {"T1": (2000.0, 2400.0), "T2": (250.0, 300.0), "PD": (0.95, 0.98)}),
}
LESION_KINDS = {"hyper": ("lesion",), "iso": ("iso-lesion",), "hypo": ("hypo-lesion",),
                "mixed": ("lesion", "iso-lesion", "hypo-lesion"), "tumour": ("tumour", "oedema", "necrosis")}

_T1_CSF, _FLAIR_TR = TISSUES["CSF"]["T1"], 9000.0
PROTOCOLS = {  # ms; FLAIR TI nulls CSF for the finite TR: 1 - 2 exp(-TI/T1) + exp(-TR/T1) = 0
    "T1": {"TR": 500.0, "TE": 12.0},
    "T2": {"TR": 4000.0, "TE": 100.0},
    "PD": {"TR": 4000.0, "TE": 15.0},
    "FLAIR": {"TR": _FLAIR_TR, "TE": 100.0,
              "TI": _T1_CSF * math.log(2.0 / (1.0 + math.exp(-_FLAIR_TR / _T1_CSF)))},
}
SCALE = 1000.0

_MARGIN_MM, _FOV_STEP_MM = 12.0, 16.0
_TEXTURE_MM = 2.0                       # texture noise lives on the 2 mm grid, any resolution
_CASE = re.compile(r"^phantom_\d+(_\d{4})?\.nii\.gz$")


@dataclass
class Subject:
    images: dict[str, Volume]    # acquired: lesions, bias, Rician noise
    clean: dict[str, Volume]     # the same without noise
    healthy: dict[str, Volume]   # the same subject without lesions and noise
    labels: Volume               # uint8, LABELS


# ----------------------------------------------------------------------------- anatomy
@dataclass(frozen=True)
class _Template:
    fractions: np.ndarray        # (3, i, j, k) CSF, GM, WM at 1 mm (nilearn array order, RAS)
    ras_to_index: np.ndarray     # 4x4
    lo: np.ndarray               # RAS mm of the first 1 mm template voxel inside the box
    fov: np.ndarray              # box size, mm (x, y, z)
    centre: np.ndarray           # RAS mm, centre of the deep brain (ventricle area)


@functools.lru_cache(maxsize=1)
def _mni() -> _Template:
    """The MNI ICBM152 2009 maps shipped inside nilearn (local files, no download)."""
    from nilearn import datasets

    gm_img = datasets.load_mni152_gm_template(resolution=1)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).dataobj, dtype=np.float32)
    gm = np.asarray(gm_img.dataobj, dtype=np.float32)
    mask = np.asarray(datasets.load_mni152_brain_mask(resolution=1).dataobj, dtype=np.float32)
    mask = ndimage.gaussian_filter(mask, 0.5)
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    fractions = np.stack([csf, gm, wm])
    # the GM/WM maps have a faint halo (up to 0.12) in the skull: keep 2 mm around the brain
    brain = ndimage.binary_dilation(fractions.sum(0) >= 0.5, iterations=2)
    fractions *= np.clip(ndimage.gaussian_filter(brain.astype(np.float32), 1.0) * 2.0, 0.0, 1.0)
    affine = np.asarray(gm_img.affine, dtype=np.float64)
    inside = np.argwhere(fractions.sum(0) > 0.01)
    first = affine[:3, :3] @ inside.min(0) + affine[:3, 3]
    last = affine[:3, :3] @ inside.max(0) + affine[:3, 3]
    fov = np.ceil((last - first + 1 + 2 * _MARGIN_MM) / _FOV_STEP_MM) * _FOV_STEP_MM
    lo = np.floor((first + last) / 2 - fov / 2 + 0.5)
    return _Template(fractions, np.linalg.inv(affine), lo, fov, np.array([0.0, -10.0, 15.0]))


@functools.lru_cache(maxsize=2)
def _prefiltered(resolution: float) -> np.ndarray:
    """Template fractions blurred so that linear sampling gives `resolution`-mm voxel fractions."""
    fractions = _mni().fractions
    sigma = math.sqrt(max(resolution**2 - 1.0, 0.0) / 12.0)    # 1 mm box -> resolution box
    if sigma < 0.05:
        return fractions
    return np.stack([ndimage.gaussian_filter(f, sigma) for f in fractions])


def _axes_mm(resolution: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RAS mm of the voxel centres along x, y, z of the output grid."""
    t = _mni()
    sizes = np.maximum(1, np.round(t.fov / resolution)).astype(int)
    # a resolution-r voxel covers r template voxels exactly: first centre at lo + (r - 1) / 2
    return tuple(t.lo[a] + (resolution - 1.0) / 2 + resolution * np.arange(sizes[a])
                 for a in range(3))


def grid(resolution: float = 2.0) -> Geometry:
    """The phantom's output grid at `resolution` mm (LPS, as SimpleITK describes it)."""
    x, y, z = _axes_mm(resolution)
    return Geometry((len(x), len(y), len(z)), (float(resolution),) * 3,
                    (-float(x[0]), -float(y[0]), float(z[0])),
                    (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))


def _cosine_field(coef: np.ndarray, axes, fov, lo) -> np.ndarray:
    """sum_abc coef[a,b,c] cos(pi a u_x) cos(pi b u_y) cos(pi c u_z), u in [0, 1] over the box.

    Returned as (z, y, x)."""
    basis = [np.cos(np.pi * ((axes[d] - lo[d]) / fov[d])[:, None] * np.arange(coef.shape[d]))
             for d in range(3)]
    return np.einsum("abc,xa,yb,zc->zyx", coef, *basis, optimize=True)


def _random_coef(rng: np.random.Generator, order: int, rms: float) -> np.ndarray:
    """Cosine coefficients with a 1/(1+k^2) spectrum, no constant term, scaled to `rms`."""
    k = np.arange(order)
    k2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2
    coef = rng.standard_normal((order,) * 3) / (1.0 + k2)
    coef[0, 0, 0] = 0.0
    weight = np.prod(np.meshgrid(*[np.where(k == 0, 1.0, 0.5)] * 3, indexing="ij"), axis=0)
    return coef * rms / math.sqrt(float(np.sum(coef**2 * weight)))   # analytic RMS over the box


def _rotation(rng: np.random.Generator, degrees: float) -> np.ndarray:
    ax, ay, az = np.radians(np.clip(rng.normal(0.0, degrees, 3), -2 * degrees, 2 * degrees))
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _warped_fractions(rng: np.random.Generator, resolution: float) -> np.ndarray:
    """(3, z, y, x) CSF, GM, WM fractions of a new subject on the output grid."""
    t = _mni()
    axes = _axes_mm(resolution)
    scale = (1.0 + np.clip(rng.normal(0.0, 0.03), -0.06, 0.06)) \
        * (1.0 + np.clip(rng.normal(0.0, 0.015, 3), -0.03, 0.03))          # overall x per axis
    linear = _rotation(rng, 3.0) @ np.diag(scale)
    shift = np.clip(rng.normal(0.0, 1.0, 3), -2.5, 2.5)
    enlarge = rng.uniform(-0.1, 0.3)                  # > 0: larger ventricles and deep structures
    amplitude = rng.uniform(1.2, 2.0)                 # displacement RMS per component, mm
    displacement = [_cosine_field(_random_coef(rng, 5, amplitude), axes, t.fov, t.lo)
                    for _ in range(3)]

    p = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")[::-1]      # x, y, z each (z, y, x)
    d = [p[a] - t.centre[a] for a in range(3)]
    shrink = 1.0 - enlarge * np.exp(-(d[0] ** 2 + d[1] ** 2 + d[2] ** 2) / (2 * 15.0**2))
    d = [da * shrink for da in d]
    del p, shrink
    q = [t.centre[a] + shift[a] + sum(linear[a, b] * d[b] for b in range(3)) + displacement[a]
         for a in range(3)]
    index = [t.ras_to_index[a, 3] + sum(t.ras_to_index[a, b] * q[b] for b in range(3))
             for a in range(3)]
    del q, d, displacement
    coords = np.stack(index)
    tpl = _prefiltered(resolution)
    out = np.stack([ndimage.map_coordinates(f, coords, order=1, mode="constant") for f in tpl])
    return np.clip(out, 0.0, 1.0)


def _tissue_labels(fractions: np.ndarray) -> np.ndarray:
    labels = (1 + np.argmax(fractions, axis=0)).astype(np.uint8)
    labels[fractions.sum(0) < 0.5] = 0
    return labels


# ----------------------------------------------------------------------------- texture, lesions
def _textures(rng: np.random.Generator, n: int, resolution: float) -> np.ndarray:
    """n smooth unit-variance random fields (z, y, x), drawn on the 2 mm grid at any resolution."""
    t = _mni()
    shape = tuple(int(s) for s in np.maximum(1, np.round(t.fov / _TEXTURE_MM)).astype(int)[::-1])
    fields = rng.standard_normal((n,) + shape, dtype=np.float32)
    fields = np.stack([ndimage.gaussian_filter(f, 1.0) for f in fields])
    fields /= fields.std(axis=(1, 2, 3), keepdims=True)
    if resolution == _TEXTURE_MM:
        return fields
    x, y, z = _axes_mm(resolution)
    tex = [(a - t.lo[i] - (_TEXTURE_MM - 1.0) / 2) / _TEXTURE_MM for i, a in enumerate((x, y, z))]
    for axis, pos in zip((3, 2, 1), tex):            # separable linear interpolation, edges clamped
        pos = np.clip(pos, 0, fields.shape[axis] - 1)
        i0 = np.minimum(pos.astype(int), fields.shape[axis] - 2)
        w = np.expand_dims((pos - i0).astype(np.float32), [a for a in range(4) if a != axis])
        lower = np.take(fields, i0, axis=axis)
        fields = lower + (np.take(fields, i0 + 1, axis=axis) - lower) * w
    return fields


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(3)
    return v / np.linalg.norm(v)


def _box(axes, c: np.ndarray, reach: float):
    """The (z, y, x) slices of the grid voxels within `reach` mm of `c` (RAS mm) along every axis,
    and their offsets from `c` in mm (z, y, x arrays); (None, None) when the box misses the grid."""
    box = [np.flatnonzero(np.abs(axes[a] - c[a]) <= reach) for a in range(3)]
    if any(len(b) == 0 for b in box):
        return None, None
    sl = tuple(slice(b[0], b[-1] + 1) for b in box[::-1])
    return sl, np.meshgrid(axes[2][sl[0]] - c[2], axes[1][sl[1]] - c[1], axes[0][sl[2]] - c[0], indexing="ij")


def _blob(rng: np.random.Generator, c: np.ndarray, r: float, axes, resolution: float):
    """A deformed ellipsoid of radius about `r` mm around `c` (RAS mm): (z, y, x) slices, part in [0, 1]."""
    semi = r * np.exp(np.clip(rng.normal(0.0, 0.25, 3), -0.5, 0.5))
    semi *= r / np.prod(semi) ** (1 / 3)
    rot = np.linalg.qr(rng.standard_normal((3, 3)))[0]
    lin, quad = rng.normal(0.0, 0.1, 3), rng.normal(0.0, 0.15, (3, 3))
    quad = (quad + quad.T) / 2
    sl, offsets = _box(axes, c, 1.6 * semi.max() + resolution)
    if sl is None:
        return None, None
    local = np.stack(offsets[::-1], axis=-1) @ rot
    dist = np.linalg.norm(local, axis=-1)
    n = local / np.maximum(dist, 1e-6)[..., None]
    rho = np.linalg.norm(local / semi, axis=-1)
    bump = np.clip(n @ lin + np.einsum("...i,ij,...j->...", n, quad, n), -0.4, 0.4)
    return sl, np.clip(0.5 + (1.0 + bump - rho) * r / resolution, 0.0, 1.0).astype(np.float32)


def _white_matter_pools(fractions: np.ndarray, resolution: float):
    """Where lesions may go, worked out on a grid of about 2 mm whatever the resolution."""
    step = max(1, round(2.0 / resolution))
    coarse = fractions[:, ::step, ::step, ::step]
    edt = functools.partial(ndimage.distance_transform_edt, sampling=resolution * step)
    white = coarse[2] >= 0.5
    brain_depth = edt(coarse.sum(0) >= 0.5)
    ventricles = (coarse[0] >= 0.5) & (brain_depth >= 20.0)
    near_ventricle = edt(~ventricles) <= 6.0 if ventricles.any() else np.zeros(white.shape, bool)
    near_gm = edt(coarse[1] < 0.5) <= 3.0
    pools = {"deep": white & ~near_gm & ~near_ventricle, "peri": white & near_ventricle,
             "juxta": white & near_gm & ~near_ventricle}
    return step, white, edt(white), pools


def _pick(rng: np.random.Generator, pool: np.ndarray, fallback: np.ndarray, axes, step: int,
          resolution: float) -> np.ndarray:
    """A random point (RAS mm) of a coarse-grid pool (or of `fallback` when the pool is empty)."""
    candidates = np.flatnonzero(pool) if pool.any() else np.flatnonzero(fallback)
    zi, yi, xi = np.unravel_index(candidates[rng.integers(len(candidates))], pool.shape)
    return (np.array([axes[0][::step][xi], axes[1][::step][yi], axes[2][::step][zi]])
            + rng.uniform(-0.5, 0.5, 3) * resolution * step)


def _lesions(rng: np.random.Generator, kinds: list[str], fractions: np.ndarray, resolution: float):
    """Lesion map L in [0, 1] (z, y, x), index of the dominant lesion per voxel, its (T1, T2, PD)
    and its label value; `kinds` names each lesion's entry of ANOMALIES."""
    count = len(kinds)
    shape = fractions.shape[1:]
    lesion = np.zeros(shape, np.float32)
    owner = np.zeros(shape, np.int16)
    params = np.zeros((count + 1, 3))
    values = np.zeros(count + 1, np.uint8)
    if count == 0:
        return lesion, owner, params, values
    step, white, wm_depth, pools = _white_matter_pools(fractions, resolution)
    axes = _axes_mm(resolution)                     # x, y, z centres
    for k, kind in enumerate(kinds, start=1):
        radius = math.exp(rng.uniform(math.log(2.0), math.log(12.0)))
        u = rng.random()
        place = "deep" if u < 0.55 else "peri" if u < 0.8 else "juxta"
        pool = pools[place]
        if place == "deep":
            pool = pool & (wm_depth >= min(0.6 * radius, 6.0))
        centre = _pick(rng, pool, white, axes, step, resolution)
        lobes = [(centre, radius)]
        for _ in range(rng.binomial(2, 0.35) if radius > 4.0 else 0):
            lobes.append((centre + 0.7 * radius * _unit(rng), radius * rng.uniform(0.4, 0.7)))
        values[k] = ANOMALIES[kind][0]
        params[k] = _tissue_params(rng, kind)
        for c, r in lobes:
            sl, part = _blob(rng, c, r, axes, resolution)
            if sl is None:
                continue
            region = lesion[sl]
            owner[sl][part > region] = k
            lesion[sl] = np.maximum(region, part)
    return lesion, owner, params, values


def _push(arrays: np.ndarray, centre: np.ndarray, amplitude: float, width: float,
          resolution: float) -> np.ndarray:
    """Mass effect: (n, z, y, x) maps with the tissue around `centre` (RAS mm) pushed outwards.

    A voxel at distance d from the centre takes the value found at distance d - u(d) along the
    same ray, u(d) = amplitude exp(-d^2 / (2 width^2)); monotone (no folding) while
    width > 0.61 amplitude. Voxels farther than 4 widths keep their values exactly."""
    reach = 4.0 * width
    sl, rel = _box(_axes_mm(resolution), centre, reach)
    if sl is None:
        return arrays
    d = np.sqrt(rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2)
    shrink = np.maximum(d - amplitude * np.exp(-d**2 / (2 * width**2)), 0.0) / np.maximum(d, 1e-6)
    shrink[d > reach] = 1.0                     # u(4 widths) = 3e-4 amplitude: cut off, exactly
    # array indices grow with RAS mm on every axis (step `resolution`): shift each index by the offset
    index = np.meshgrid(*[np.arange(s.start, s.stop) for s in sl], indexing="ij")
    coords = np.stack([index[a] + (shrink - 1.0) * rel[a] / resolution for a in range(3)])
    out = arrays.copy()
    for i in range(len(arrays)):
        out[i][sl] = ndimage.map_coordinates(arrays[i], coords, order=1, mode="nearest")
    return out


def _tumour(rng: np.random.Generator, fractions: np.ndarray, texture: np.ndarray, resolution: float):
    """One glioma-like mass: fractions and texture with its mass effect, and its solid, necrosis
    and oedema maps (z, y, x, in [0, 1]; necrosis within the solid map, oedema a share of WM)."""
    step, white, wm_depth, pools = _white_matter_pools(fractions, resolution)
    axes = _axes_mm(resolution)
    radius = rng.uniform(8.0, 15.0)
    centre = _pick(rng, pools["deep"] & (wm_depth >= 4.0), white, axes, step, resolution)
    amplitude = 0.7 * radius
    fractions, texture = (_push(a, centre, amplitude, radius + 8.0, resolution) for a in (fractions, texture))
    shape = fractions.shape[1:]
    maps = {name: np.zeros(shape, np.float32) for name in ("solid", "necrosis", "oedema")}
    for name, r in (("solid", radius), ("necrosis", radius * rng.uniform(0.4, 0.65)),
                    ("oedema", radius + rng.uniform(6.0, 14.0))):
        sl, part = _blob(rng, centre, r, axes, resolution)
        if sl is not None and (name != "necrosis" or rng.random() < 0.75):
            maps[name][sl] = part
    maps["oedema"] = ndimage.gaussian_filter(maps["oedema"], 2.0 / resolution)
    maps["necrosis"] = np.minimum(maps["necrosis"], maps["solid"])
    return fractions, texture, maps


# ----------------------------------------------------------------------------- signals
def _signal(channel: str, t1, t2, pd):
    p = PROTOCOLS[channel]
    if channel == "FLAIR":
        inversion = np.abs(1.0 - 2.0 * np.exp(-p["TI"] / t1) + np.exp(-p["TR"] / t1))
        return pd * inversion * np.exp(-p["TE"] / t2)
    return pd * (1.0 - np.exp(-p["TR"] / t1)) * np.exp(-p["TE"] / t2)


def _jitter(rng: np.random.Generator, sd: float):
    return 1.0 + float(np.clip(rng.normal(0.0, sd), -2 * sd, 2 * sd))


def _check(*, seed, resolution, noise, lesions, subjects=1, lesion_kind="hyper") -> None:
    """One-line errors for arguments a user may get wrong on the command line."""
    def whole(v, least):
        return not isinstance(v, bool) and isinstance(v, (int, np.integer)) and v >= least

    if not whole(seed, 0):
        raise DiffusionMICError(f"phantom seed must be a whole number >= 0, got {seed!r}")
    if not whole(subjects, 1):
        raise DiffusionMICError(f"phantom subjects must be a whole number >= 1, got {subjects!r}")
    if not (isinstance(resolution, numbers.Real) and 0.5 <= resolution <= 8):
        raise DiffusionMICError(f"phantom resolution must be between 0.5 and 8 mm, got {resolution!r}")
    if not (isinstance(noise, numbers.Real) and 0 <= noise <= 100):
        raise DiffusionMICError(f"phantom noise must be a percent between 0 and 100, got {noise!r}")
    if not whole(lesions, 0):
        raise DiffusionMICError(f"phantom lesions must be a whole number >= 0, got {lesions!r}")
    if lesion_kind not in LESION_KINDS:
        raise DiffusionMICError(f"phantom lesion kind must be one of {', '.join(LESION_KINDS)}, got {lesion_kind!r}")


def labels_for(lesion_kind: str = "hyper") -> dict[str, int]:
    """The label map's labels for a lesion kind: the tissues and the abnormal tissues it can hold."""
    return {**{k: v for k, v in LABELS.items() if v < 4},
            **{name: ANOMALIES[name][0] for name in LESION_KINDS[lesion_kind]}}


def _lesion_kinds(seed: int, lesion_kind: str, count: int) -> list[str]:
    """Each lesion's ANOMALIES entry; mixed draws them from their own generator, so the lesions
    land where the other kinds put them."""
    names = LESION_KINDS[lesion_kind]
    if lesion_kind == "tumour":
        return []
    if len(names) == 1:
        return list(names) * count
    return [names[i] for i in np.random.default_rng([seed, 1]).integers(len(names), size=count)]


def _tissue_params(rng: np.random.Generator, name: str) -> tuple[float, float, float]:
    ranges = ANOMALIES[name][1]
    return tuple(rng.uniform(*ranges[p]) for p in ("T1", "T2", "PD"))


def make_subject(seed: int, *, resolution: float = 2.0, noise: float = 3.0,
                 lesions: int = 3, lesion_kind: str = "hyper") -> Subject:
    """One simulated subject: T1w, T2w, PD and FLAIR (acquired, clean, healthy) and its label map.

    `resolution` mm isotropic (1 or 2 are typical), `noise` Rician noise in percent of the
    brightest tissue, `lesions` number of lesions (0: a healthy subject; tumour: one tumour
    when > 0), `lesion_kind` one of LESION_KINDS.
    """
    _check(seed=seed, resolution=resolution, noise=noise, lesions=lesions, lesion_kind=lesion_kind)
    resolution, lesions = float(resolution), int(lesions)
    rng = np.random.default_rng(seed)

    # per-subject draws, in a fixed order
    tissue = {name: {"T1": v["T1"] * _jitter(rng, 0.01 if name == "CSF" else 0.04),
                     "T2": v["T2"] * _jitter(rng, 0.01 if name == "CSF" else 0.04),
                     "PD": v["PD"] * _jitter(rng, 0.01 if name == "CSF" else 0.03)}
              for name, v in TISSUES.items()}
    anatomy = _warped_fractions(rng, resolution)
    t = _mni()
    bias_coef = _random_coef(rng, 3, rng.uniform(0.06, 0.11))       # log-field RMS 6-11 %
    bias = np.exp(_cosine_field(bias_coef, _axes_mm(resolution), t.fov, t.lo)).astype(np.float32)
    texture = _textures(rng, 4, resolution)       # T1 and PD modulation, GM/lesion and WM
    amp = 0.03
    fractions, textured, tumour = anatomy, texture, None
    if lesion_kind == "tumour" and lesions > 0:
        fractions, textured, tumour = _tumour(rng, anatomy, texture, resolution)

    def signals(fr: np.ndarray, tx: np.ndarray):
        """Per channel: the mixed healthy signal and the CSF, GM, WM signals (inside voxels)."""
        tex_t1 = {"CSF": 1.0, "GM": 1.0 + amp * tx[0], "WM": 1.0 + amp * tx[2]}
        tex_pd = {"CSF": 1.0, "GM": 1.0 + amp * tx[1], "WM": 1.0 + amp * tx[3]}
        out = {}
        for ch in CHANNELS:
            per = [_signal(ch, tissue[n]["T1"] * tex_t1[n], tissue[n]["T2"], tissue[n]["PD"] * tex_pd[n])
                   for n in ("CSF", "GM", "WM")]
            out[ch] = (sum(fi * s for fi, s in zip(fr, per)), per)
        return out

    def textured_abnormal(t1, t2, pd, tx0, tx1):
        """Abnormal tissue's (T1, T2, PD) with 1.5 x the texture of the healthy tissues."""
        return t1 * (1.0 + 1.5 * amp * tx0), t2, pd * (1.0 + 1.5 * amp * tx1)

    labels = _tissue_labels(fractions)
    inside = (anatomy.sum(0) > 1e-4) | (fractions.sum(0) > 1e-4)
    f = fractions[:, inside]
    tx = textured[:, inside]
    mixed = signals(f, tx)
    if tumour is None:
        healthy_in = {ch: v[0] for ch, v in mixed.items()}
    else:                               # the undeformed anatomy, zero where it has no tissue
        own = (anatomy.sum(0) > 1e-4)[inside]
        healthy_in = {ch: v[0] * own for ch, v in signals(anatomy[:, inside], texture[:, inside]).items()}
    clean_in = {ch: v[0].copy() for ch, v in mixed.items()}

    lesion, owner, lparams, lvalues = _lesions(rng, _lesion_kinds(seed, lesion_kind, lesions), fractions,
                                               resolution)
    in_lesion = lesion[inside] > 0
    if in_lesion.any():
        lk = lesion[inside][in_lesion]
        par = lparams[owner[inside][in_lesion]]
        gm, wm = f[1][in_lesion], f[2][in_lesion]
        abnormal = textured_abnormal(par[:, 0], par[:, 1], par[:, 2], tx[0][in_lesion], tx[1][in_lesion])
        for ch in CHANNELS:
            s_gm, s_wm = (s[in_lesion] if np.ndim(s) else s for s in mixed[ch][1][1:])
            s_les = _signal(ch, *abnormal)
            clean_in[ch][in_lesion] += lk * ((gm + wm) * s_les - gm * s_gm - wm * s_wm)
        les_label = (lesion >= 0.5) & ((labels == LABELS["GM"]) | (labels == LABELS["WM"]))
        labels[les_label] = lvalues[owner[les_label]]
    if tumour is not None:
        # the mass replaces every tissue (within the brain), oedema a share of the white matter
        brain = np.minimum(f.sum(0), 1.0)
        solid, necrosis = tumour["solid"][inside] * brain, tumour["necrosis"][inside] * brain
        wm_oedema = f[2] * (1.0 - solid) * tumour["oedema"][inside]
        abnormal = [textured_abnormal(*_tissue_params(rng, n), tx[0], tx[1])
                    for n in ("tumour", "oedema", "necrosis")]
        for ch in CHANNELS:
            s_sol, s_oed, s_nec = (_signal(ch, *t) for t in abnormal)
            s_wm = mixed[ch][1][2]
            clean_in[ch] = ((1.0 - solid) * mixed[ch][0] + wm_oedema * (s_oed - s_wm)
                            + (solid - necrosis) * s_sol + necrosis * s_nec)
        value = np.zeros(solid.shape, np.uint8)
        value[wm_oedema >= 0.5] = ANOMALIES["oedema"][0]
        value[solid >= 0.5] = ANOMALIES["tumour"][0]
        value[(solid >= 0.5) & (necrosis >= solid / 2)] = ANOMALIES["necrosis"][0]
        labels[inside] = np.where(value > 0, value, labels[inside])

    geometry = grid(resolution)
    bias_in = bias[inside]

    def volume(values_in):
        arr = np.zeros(labels.shape, np.float32)
        arr[inside] = SCALE * values_in * bias_in
        return Volume(arr, geometry)

    healthy = {ch: volume(healthy_in[ch]) for ch in CHANNELS}
    clean = {ch: volume(clean_in[ch]) for ch in CHANNELS}
    images = {}
    for ch in CHANNELS:
        if noise == 0:
            images[ch] = Volume(clean[ch].array.copy(), geometry)
            continue
        brightest = SCALE * max(float(_signal(ch, v["T1"], v["T2"], v["PD"])) for v in tissue.values())
        sigma = np.float32(noise / 100.0 * brightest)
        n1 = rng.standard_normal(labels.shape, dtype=np.float32) * sigma
        n2 = rng.standard_normal(labels.shape, dtype=np.float32) * sigma
        images[ch] = Volume(np.sqrt((clean[ch].array + n1) ** 2 + n2**2), geometry)
    return Subject(images=images, clean=clean, healthy=healthy, labels=Volume(labels, geometry))


# ----------------------------------------------------------------------------- data set
def subject_seed(seed: int, index: int) -> int:
    """The seed of subject `index` of a phantom made with `seed` (numpy SeedSequence spawn key)."""
    return int(np.random.SeedSequence(seed, spawn_key=(index,)).generate_state(1, np.uint64)[0])


def write_phantom(out: Path, *, subjects: int = 4, seed: int = 0, resolution: float = 2.0,
                  noise: float = 3.0, lesions: int = 3, lesion_kind: str = "hyper",
                  progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Write `subjects` simulated subjects to `out` in nnU-Net v2 raw layout; return the case ids.

    out/dataset.json, imagesTr/<case>_000{0..3}.nii.gz (acquired), labelsTr/<case>.nii.gz,
    cleanTr/<case>_000{0..3}.nii.gz (no noise), healthyTr/<case>_000{0..3}.nii.gz (no lesions,
    no noise). Channels 0..3 are T1, T2, PD, FLAIR; labels as `labels_for(lesion_kind)`. Same
    arguments, same files. Phantom files
    (phantom_NNN...) of an earlier run in these folders that this run does not write are removed.
    """
    _check(seed=seed, resolution=resolution, noise=noise, lesions=lesions, subjects=subjects,
           lesion_kind=lesion_kind)
    out = Path(out)
    cases = [f"phantom_{i:03d}" for i in range(int(subjects))]
    folders = {name: out / name for name in ("imagesTr", "labelsTr", "cleanTr", "healthyTr")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    written: set[Path] = set()
    for i, case in enumerate(cases):
        s = make_subject(subject_seed(seed, i), resolution=resolution, noise=noise, lesions=lesions,
                         lesion_kind=lesion_kind)
        for variant, images in (("imagesTr", s.images), ("cleanTr", s.clean),
                                ("healthyTr", s.healthy)):
            for c, ch in enumerate(CHANNELS):
                written.add(write_volume(images[ch], folders[variant] / f"{case}_{c:04d}.nii.gz"))
        written.add(write_volume(s.labels, folders["labelsTr"] / f"{case}.nii.gz"))
        if progress is not None:
            progress(i + 1, len(cases))
    for folder in folders.values():
        for stale in folder.iterdir():
            if _CASE.match(stale.name) and stale not in written:
                stale.unlink()
    meta = {
        "name": "DiffusionMIC brain phantom",
        "description": "BrainWeb-style simulation on the MNI ICBM152 2009 anatomy "
                       "(DiffusionMICLib.phantom); cleanTr: no noise, healthyTr: no lesions, no noise",
        "channel_names": {str(c): ch for c, ch in enumerate(CHANNELS)},
        "labels": labels_for(lesion_kind),
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
        "phantom": {"seed": int(seed), "subjects": len(cases), "resolution": float(resolution),
                    "noise": float(noise), "lesions": int(lesions), "lesion_kind": lesion_kind,
                    "scale": SCALE, "protocols": PROTOCOLS, "tissues": TISSUES},
    }
    tmp = out / f".tmp-{secrets.token_hex(4)}-dataset.json"
    tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / "dataset.json")
    return cases
