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
placed in deep WM (55 %), periventricular (25 %) or juxtacortical (20 %) white matter; each has
its own T1 (900-1200 ms), T2 (140-240 ms) and PD (0.85-0.95): hypointense on T1w, bright on
T2w and FLAIR. They replace GM/WM (never CSF) with soft, partial-volume edges.

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


def _lesions(rng: np.random.Generator, count: int, fractions: np.ndarray, resolution: float):
    """Lesion map L in [0, 1] (z, y, x), index of the dominant lesion per voxel, and its parameters."""
    shape = fractions.shape[1:]
    lesion = np.zeros(shape, np.float32)
    owner = np.zeros(shape, np.int16)
    params = np.zeros((count + 1, 3))
    if count == 0:
        return lesion, owner, params
    # where lesions may go, worked out on a grid of about 2 mm whatever the resolution
    step = max(1, round(2.0 / resolution))
    coarse = fractions[:, ::step, ::step, ::step]
    edt = functools.partial(ndimage.distance_transform_edt, sampling=resolution * step)
    white = coarse[2] >= 0.5
    brain_depth = edt(coarse.sum(0) >= 0.5)
    ventricles = (coarse[0] >= 0.5) & (brain_depth >= 20.0)
    near_ventricle = edt(~ventricles) <= 6.0 if ventricles.any() else np.zeros(white.shape, bool)
    near_gm = edt(coarse[1] < 0.5) <= 3.0
    wm_depth = edt(white)
    pools = {"deep": white & ~near_gm & ~near_ventricle, "peri": white & near_ventricle,
             "juxta": white & near_gm & ~near_ventricle}
    axes = _axes_mm(resolution)                     # x, y, z centres
    coarse_axes = [a[::step] for a in axes]
    for k in range(1, count + 1):
        radius = math.exp(rng.uniform(math.log(2.0), math.log(12.0)))
        u = rng.random()
        place = "deep" if u < 0.55 else "peri" if u < 0.8 else "juxta"
        pool = pools[place]
        if place == "deep":
            pool = pool & (wm_depth >= min(0.6 * radius, 6.0))
        candidates = np.flatnonzero(pool) if pool.any() else np.flatnonzero(white)
        zi, yi, xi = np.unravel_index(candidates[rng.integers(len(candidates))], white.shape)
        centre = (np.array([coarse_axes[0][xi], coarse_axes[1][yi], coarse_axes[2][zi]])
                  + rng.uniform(-0.5, 0.5, 3) * resolution * step)
        lobes = [(centre, radius)]
        for _ in range(rng.binomial(2, 0.35) if radius > 4.0 else 0):
            lobes.append((centre + 0.7 * radius * _unit(rng), radius * rng.uniform(0.4, 0.7)))
        params[k] = [rng.uniform(*LESION_RANGE[p]) for p in ("T1", "T2", "PD")]
        for c, r in lobes:
            semi = r * np.exp(np.clip(rng.normal(0.0, 0.25, 3), -0.5, 0.5))
            semi *= r / np.prod(semi) ** (1 / 3)
            rot = np.linalg.qr(rng.standard_normal((3, 3)))[0]
            lin, quad = rng.normal(0.0, 0.1, 3), rng.normal(0.0, 0.15, (3, 3))
            quad = (quad + quad.T) / 2
            reach = 1.6 * semi.max() + resolution
            box = [np.flatnonzero(np.abs(axes[a] - c[a]) <= reach) for a in range(3)]
            if any(len(b) == 0 for b in box):
                continue
            sl = tuple(slice(b[0], b[-1] + 1) for b in box[::-1])          # z, y, x
            local = np.stack(np.meshgrid(axes[2][sl[0]] - c[2], axes[1][sl[1]] - c[1],
                                         axes[0][sl[2]] - c[0], indexing="ij")[::-1], axis=-1) @ rot
            dist = np.linalg.norm(local, axis=-1)
            n = local / np.maximum(dist, 1e-6)[..., None]
            rho = np.linalg.norm(local / semi, axis=-1)
            bump = np.clip(n @ lin + np.einsum("...i,ij,...j->...", n, quad, n), -0.4, 0.4)
            part = np.clip(0.5 + (1.0 + bump - rho) * r / resolution, 0.0, 1.0).astype(np.float32)
            region = lesion[sl]
            owner[sl][part > region] = k
            lesion[sl] = np.maximum(region, part)
    return lesion, owner, params


# ----------------------------------------------------------------------------- signals
def _signal(channel: str, t1, t2, pd):
    p = PROTOCOLS[channel]
    if channel == "FLAIR":
        inversion = np.abs(1.0 - 2.0 * np.exp(-p["TI"] / t1) + np.exp(-p["TR"] / t1))
        return pd * inversion * np.exp(-p["TE"] / t2)
    return pd * (1.0 - np.exp(-p["TR"] / t1)) * np.exp(-p["TE"] / t2)


def _jitter(rng: np.random.Generator, sd: float):
    return 1.0 + float(np.clip(rng.normal(0.0, sd), -2 * sd, 2 * sd))


def _check(*, seed, resolution, noise, lesions, subjects=1) -> None:
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


def make_subject(seed: int, *, resolution: float = 2.0, noise: float = 3.0,
                 lesions: int = 3) -> Subject:
    """One simulated subject: T1w, T2w, PD and FLAIR (acquired, clean, healthy) and its label map.

    `resolution` mm isotropic (1 or 2 are typical), `noise` Rician noise in percent of the
    brightest tissue, `lesions` number of lesions (0: a healthy subject).
    """
    _check(seed=seed, resolution=resolution, noise=noise, lesions=lesions)
    resolution, lesions = float(resolution), int(lesions)
    rng = np.random.default_rng(seed)

    # per-subject draws, in a fixed order
    tissue = {name: {"T1": v["T1"] * _jitter(rng, 0.01 if name == "CSF" else 0.04),
                     "T2": v["T2"] * _jitter(rng, 0.01 if name == "CSF" else 0.04),
                     "PD": v["PD"] * _jitter(rng, 0.01 if name == "CSF" else 0.03)}
              for name, v in TISSUES.items()}
    fractions = _warped_fractions(rng, resolution)
    t = _mni()
    bias_coef = _random_coef(rng, 3, rng.uniform(0.06, 0.11))       # log-field RMS 6-11 %
    bias = np.exp(_cosine_field(bias_coef, _axes_mm(resolution), t.fov, t.lo)).astype(np.float32)
    texture = _textures(rng, 4, resolution)       # T1 and PD modulation, GM/lesion and WM
    amp = 0.03

    labels = _tissue_labels(fractions)
    inside = fractions.sum(0) > 1e-4
    f = fractions[:, inside]
    tx = texture[:, inside]
    tex_t1 = {"CSF": 1.0, "GM": 1.0 + amp * tx[0], "WM": 1.0 + amp * tx[2]}
    tex_pd = {"CSF": 1.0, "GM": 1.0 + amp * tx[1], "WM": 1.0 + amp * tx[3]}
    healthy_in = {}
    tissue_signal = {}
    for ch in CHANNELS:
        per = [_signal(ch, tissue[n]["T1"] * tex_t1[n], tissue[n]["T2"], tissue[n]["PD"] * tex_pd[n])
               for n in ("CSF", "GM", "WM")]
        tissue_signal[ch] = per
        healthy_in[ch] = sum(fi * s for fi, s in zip(f, per))

    lesion, owner, lparams = _lesions(rng, lesions, fractions, resolution)
    in_lesion = lesion[inside] > 0
    clean_in = {ch: v.copy() for ch, v in healthy_in.items()}
    if in_lesion.any():
        lk = lesion[inside][in_lesion]
        par = lparams[owner[inside][in_lesion]]
        gm, wm = f[1][in_lesion], f[2][in_lesion]
        lt1 = par[:, 0] * (1.0 + 1.5 * amp * tx[0][in_lesion])
        lpd = par[:, 2] * (1.0 + 1.5 * amp * tx[1][in_lesion])
        for ch in CHANNELS:
            s_gm, s_wm = (s[in_lesion] if np.ndim(s) else s for s in tissue_signal[ch][1:])
            s_les = _signal(ch, lt1, par[:, 1], lpd)
            clean_in[ch][in_lesion] += lk * ((gm + wm) * s_les - gm * s_gm - wm * s_wm)
        les_label = (lesion >= 0.5) & ((labels == LABELS["GM"]) | (labels == LABELS["WM"]))
        labels[les_label] = LABELS["lesion"]

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
                  noise: float = 3.0, lesions: int = 3,
                  progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Write `subjects` simulated subjects to `out` in nnU-Net v2 raw layout; return the case ids.

    out/dataset.json, imagesTr/<case>_000{0..3}.nii.gz (acquired), labelsTr/<case>.nii.gz,
    cleanTr/<case>_000{0..3}.nii.gz (no noise), healthyTr/<case>_000{0..3}.nii.gz (no lesions,
    no noise). Channels 0..3 are T1, T2, PD, FLAIR. Same arguments, same files. Phantom files
    (phantom_NNN...) of an earlier run in these folders that this run does not write are removed.
    """
    _check(seed=seed, resolution=resolution, noise=noise, lesions=lesions, subjects=subjects)
    out = Path(out)
    cases = [f"phantom_{i:03d}" for i in range(int(subjects))]
    folders = {name: out / name for name in ("imagesTr", "labelsTr", "cleanTr", "healthyTr")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    written: set[Path] = set()
    for i, case in enumerate(cases):
        s = make_subject(subject_seed(seed, i), resolution=resolution, noise=noise, lesions=lesions)
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
        "labels": dict(LABELS),
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
        "phantom": {"seed": int(seed), "subjects": len(cases), "resolution": float(resolution),
                    "noise": float(noise), "lesions": int(lesions),
                    "scale": SCALE, "protocols": PROTOCOLS, "tissues": TISSUES},
    }
    tmp = out / f".tmp-{secrets.token_hex(4)}-dataset.json"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out / "dataset.json")
    return cases
