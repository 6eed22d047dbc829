"""Volume I/O with exact geometry (SimpleITK), conversion to torch/MONAI, reorientation, resampling.

Arrays are (z, y, x) as `sitk.GetArrayFromImage` gives them; geometry is SimpleITK's (LPS, mm).
"""
from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

if TYPE_CHECKING:   # torch and MONAI load only when a tensor is asked for: reading and writing files
    import torch    # (and the phantom, Slicer's sample data) need neither
    from monai.data import MetaTensor

from .errors import DiffusionMICError
from .imagefiles import as_3d, is_nifti, is_radiograph, nifti_damage, read_sheared_nifti

WRITABLE = (".nrrd", ".nii", ".nii.gz", ".mha")
_COMPRESSED = (".nrrd", ".nii.gz")
_INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_AXIS_OF_LETTER = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}


class VolumeError(DiffusionMICError):
    """One-line, user-facing error naming the file and the problem."""


@dataclass(frozen=True)
class Geometry:
    """A voxel grid in physical space, as SimpleITK describes it (LPS, mm)."""

    size: tuple[int, int, int]              # (x, y, z)
    spacing: tuple[float, float, float]     # mm, (x, y, z)
    origin: tuple[float, float, float]      # LPS mm, centre of voxel (0, 0, 0)
    direction: tuple[float, ...]            # 9 floats, row-major 3x3, columns are the axes (LPS)

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Geometry:
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()),
                   tuple(image.GetOrigin()), tuple(image.GetDirection()))

    @classmethod
    def from_ras_affine(cls, affine, size) -> Geometry:
        """Inverse of `ras_affine`: the grid of `size` voxels that `affine` maps to RAS mm."""
        lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)
        spacing = np.linalg.norm(lps[:3, :3], axis=0)
        direction = lps[:3, :3] / spacing
        return cls(tuple(int(s) for s in size), tuple(spacing.tolist()),
                   tuple(lps[:3, 3].tolist()), tuple(direction.ravel().tolist()))

    def same_as(self, other: Geometry, tol: float = 1e-5) -> bool:
        """Same size, and spacing, origin and direction equal within `tol` (absolute)."""
        return (tuple(self.size) == tuple(other.size)
                and all(np.allclose(getattr(self, f), getattr(other, f), rtol=0, atol=tol)
                        for f in ("spacing", "origin", "direction")))

    def ras_affine(self) -> np.ndarray:
        """4x4 matrix from voxel index (i=x, j=y, k=z) to RAS mm (NIfTI, MONAI, Slicer IJKToRAS)."""
        affine = np.eye(4)
        affine[:3, :3] = _LPS_TO_RAS @ np.reshape(self.direction, (3, 3)) @ np.diag(self.spacing)
        affine[:3, 3] = _LPS_TO_RAS @ np.asarray(self.origin)
        return affine

    def to_dict(self) -> dict:
        return {"size": list(self.size), "spacing": list(self.spacing),
                "origin": list(self.origin), "direction": list(self.direction)}

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        return cls(tuple(int(v) for v in d["size"]), tuple(float(v) for v in d["spacing"]),
                   tuple(float(v) for v in d["origin"]), tuple(float(v) for v in d["direction"]))


@dataclass
class Volume:
    """A 3D scalar volume: an array (z, y, x) of any dtype on a `Geometry`.

    `planar`: read from a 2D image (one slice, z spacing 1 mm); written back as a 2D image.
    """

    array: np.ndarray
    geometry: Geometry
    planar: bool = False

    def __post_init__(self):
        expected = tuple(self.geometry.size[::-1])
        if self.array.shape != expected:
            raise VolumeError(f"array shape {self.array.shape} does not match the grid "
                              f"(z, y, x) = {expected}")
        if self.planar and expected[0] != 1:
            raise VolumeError(f"a planar (2D) volume has one slice, not {expected[0]}")

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Volume:
        return _to_volume(image, "image")

    def to_sitk(self) -> sitk.Image:
        """The volume as a SimpleITK image (a bool array becomes uint8)."""
        array = self.array.astype(np.uint8) if self.array.dtype == bool else self.array
        image = sitk.GetImageFromArray(array, isVector=False)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def with_array(self, array: np.ndarray) -> Volume:
        """The same grid holding other values; `array` must be (z, y, x) of the same shape."""
        return Volume(np.asarray(array), self.geometry, self.planar)

    @property
    def size(self) -> tuple[int, int, int]:
        return self.geometry.size

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.geometry.spacing

    @property
    def origin(self) -> tuple[float, float, float]:
        return self.geometry.origin

    @property
    def direction(self) -> tuple[float, ...]:
        return self.geometry.direction


def _to_volume(image: sitk.Image, label: str) -> Volume:
    """`image` as a Volume (a 4D image with one time point is squeezed, a 2D image becomes one
    planar slice, its colour luminance), or a VolumeError."""
    size = image.GetSize()
    shape = "x".join(map(str, size))
    planar = image.GetDimension() == 2 or is_radiograph(image)
    if image.GetDimension() == 4 and size[3] == 1:
        image = image[:, :, :, 0]
    elif image.GetDimension() == 2:
        image = as_3d(image)
    components = image.GetNumberOfComponentsPerPixel()
    if 0 in size:
        problem = f"empty image (size {shape})"
    elif image.GetDimension() != 3:
        problem = f"{len(size)}D image (size {shape}), a 2D image or a 3D volume is needed"
    elif components > 1:
        problem = f"{components} components per voxel (RGB or vector), a scalar volume is needed"
    else:
        return Volume(sitk.GetArrayFromImage(image), Geometry.from_sitk(image), planar)
    raise VolumeError(f"cannot use {label}: {problem}")


def _read_dicom_series(folder: Path) -> sitk.Image | None:
    """The DICOM series in `folder` with the most files, slices sorted by GDCM; None if none."""
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        return None
    reader.SetFileNames(max((reader.GetGDCMSeriesFileNames(str(folder), uid) for uid in series),
                            key=len))
    return reader.Execute()


def read_volume(path: str | os.PathLike, *, name: str | None = None) -> Volume:
    """Read a 3D scalar volume, or a 2D image as one planar slice, from a file or a DICOM folder.

    Files: .nrrd .nhdr .nii .nii.gz .mha .mhd, PNG, JPEG, a DICOM file (anything SimpleITK reads).
    A folder: the DICOM series with the most files. `name` replaces the path in error messages.
    NIfTI data shorter than its header says is refused; a NIfTI affine with shear is read on
    the nearest orthonormal grid with a DiffusionMICWarning.
    """
    path = Path(path)
    label = name or str(path)

    def fail(problem: str) -> VolumeError:
        return VolumeError(f"cannot use '{label}': {problem}")

    if not path.exists():
        raise fail("no such file or folder")
    try:
        if path.is_dir():
            image = _read_dicom_series(path)
            if image is None:
                raise fail("the folder holds no DICOM series")
        elif path.stat().st_size == 0:
            raise fail("empty file")
        elif is_nifti(path) and (damage := nifti_damage(path)):
            raise fail(damage)
        else:
            image = sitk.ReadImage(str(path))
    except RuntimeError:
        image = read_sheared_nifti(path, label) if is_nifti(path) else None
        if image is None:
            raise fail("not a readable image (unknown format or damaged file)") from None
    volume = _to_volume(image, f"'{label}'")
    bad = np.count_nonzero(~np.isfinite(volume.array)) if volume.array.dtype.kind in "fc" else 0
    if bad:
        raise fail(f"{bad} voxels are NaN or infinite")
    return volume


def _extension(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def write_volume(volume: Volume, path: str | os.PathLike) -> Path:
    """Write `volume` to .nrrd, .nii, .nii.gz or .mha atomically (temporary file, then rename).

    A planar volume is written as a 2D image. On failure nothing is left behind and an existing
    file at `path` is untouched.
    """
    path = Path(path)
    ext = _extension(path)
    if path.name.lower().endswith(".seg.nrrd"):
        raise VolumeError(f"cannot write '{path}': .seg.nrrd holds a segmentation (segfile.write_segmentation)")
    if ext not in WRITABLE:
        raise VolumeError(f"cannot write '{path}': unsupported file type '{ext or path.name}' "
                          f"(use {', '.join(WRITABLE)})")
    tmp = path.parent / f".tmp-{secrets.token_hex(4)}-{path.name}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        image = volume.to_sitk()
        sitk.WriteImage(image[:, :, 0] if volume.planar else image, str(tmp), useCompression=ext in _COMPRESSED)
        os.replace(tmp, path)
    except (RuntimeError, OSError) as e:
        tmp.unlink(missing_ok=True)
        lines = str(e).strip().splitlines() or [type(e).__name__]
        reason = lines[-1].replace(str(tmp), str(path))
        raise VolumeError(f"cannot write '{path}': {reason}") from None
    return path


def to_tensor(volume: Volume) -> torch.Tensor:
    """float32 tensor (1, z, y, x) with the volume's values."""
    import torch
    return torch.from_numpy(np.ascontiguousarray(volume.array, dtype=np.float32))[None]


def to_metatensor(volume: Volume, dtype: torch.dtype | str | None = "float32") -> MetaTensor:
    """Channel-first MetaTensor (1, x, y, z) with the RAS affine, as MONAI's LoadImage gives.

    `dtype` is a torch dtype or its name; None keeps the array's dtype.
    """
    import torch
    from monai.data import MetaTensor
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    data = torch.from_numpy(np.ascontiguousarray(volume.array.transpose(2, 1, 0)))[None]
    if dtype is not None:
        data = data.to(dtype)
    return MetaTensor(data, affine=torch.from_numpy(volume.geometry.ras_affine()),
                      meta={"space": "RAS", "original_channel_dim": "no_channel",
                            "spatial_shape": np.asarray(volume.size)})


def from_metatensor(mt: MetaTensor) -> Volume:
    """Inverse of `to_metatensor`: a (1, x, y, z) or (x, y, z) MetaTensor back to a Volume."""
    data = mt.as_tensor().detach().cpu().numpy()
    if data.ndim == 4 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 3:
        raise VolumeError(f"cannot use tensor of shape {tuple(mt.shape)}: one 3D channel needed")
    geometry = Geometry.from_ras_affine(mt.affine.detach().cpu().numpy(), data.shape)
    return Volume(np.ascontiguousarray(data.transpose(2, 1, 0)), geometry)


def orient(volume: Volume, code: str = "RAS") -> Volume:
    """Permute/flip the axes (no interpolation) so that x, y, z point toward the code's letters.

    "RAS": x increases toward Right, y toward Anterior, z toward Superior; "LPS" gives an
    identity direction. An oblique volume gets the closest permutation and keeps its obliquity.
    """
    code = code.upper()
    if sorted(_AXIS_OF_LETTER.get(c, -1) for c in code) != [0, 1, 2]:
        raise ValueError(f"orientation code {code!r}: one letter of R/L, A/P and S/I each")
    return Volume.from_sitk(sitk.DICOMOrient(volume.to_sitk(), code))


def acquired_slices(volume: Volume) -> Volume:
    """The axes permuted (no flips, no interpolation) so that array axis 0 runs along the largest
    voxel spacing: a 2D model then works on the acquired slices (a coronal scan of 3 mm slices,
    coronally). Ties keep the stored slice axis; a single image (an axis of one voxel) is its own slice."""
    spacing, size = volume.geometry.spacing, volume.geometry.size
    if 1 in size:
        thick = 2 if size[2] == 1 else size.index(1)
    else:
        thick = 2 if spacing[2] >= max(spacing) * (1 - 1e-3) else int(np.argmax(spacing))
    if thick == 2:
        return volume
    return Volume.from_sitk(sitk.PermuteAxes(volume.to_sitk(), [a for a in (0, 1, 2) if a != thick] + [thick]))


def resample_to(volume: Volume, geometry: Geometry, *, interpolation: str = "linear",
                default: float = 0.0) -> Volume:
    """Resample onto `geometry` (identity transform); voxels outside the input get `default`."""
    if interpolation not in _INTERPOLATORS:
        raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATORS)}")
    image = volume.to_sitk()
    out = sitk.Resample(image, list(geometry.size), sitk.Transform(), _INTERPOLATORS[interpolation],
                        geometry.origin, geometry.spacing, geometry.direction, float(default),
                        image.GetPixelID())
    return Volume.from_sitk(out)


def onto_grid(volume: Volume, grid: Geometry) -> np.ndarray:
    """Gaussian-prefiltered (sigma = half the downsampling factor, in voxels) linear resampling."""
    factors = np.asarray(grid.spacing) / np.asarray(volume.spacing)
    sigma = [max(0.0, (f - 1.0) / 2.0) for f in factors[::-1]]
    array = volume.array.astype(np.float32)
    if max(sigma) > 0:
        array = ndimage.gaussian_filter(array, sigma)
    return resample_to(volume.with_array(array), grid).array


def resample_spacing(volume: Volume, spacing: tuple[float, float, float], *,
                     interpolation: str = "linear") -> Volume:
    """Resample to a new voxel spacing, keeping origin, direction and physical extent."""
    return resample_to(volume, spacing_grid(volume.geometry, spacing), interpolation=interpolation)


def spacing_grid(g: Geometry, spacing: tuple[float, float, float]) -> Geometry:
    """The grid of `g`'s origin, direction and physical extent at a new voxel spacing."""
    size = tuple(max(1, round(n * s / t)) for n, s, t in zip(g.size, g.spacing, spacing))
    return Geometry(size, tuple(float(t) for t in spacing), g.origin, g.direction)
