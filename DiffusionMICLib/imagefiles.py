"""What real image files hold beyond a plain 3D grid: damaged NIfTI data, sheared NIfTI
affines, 2D images. Works on paths and SimpleITK images; `volume.read_volume` uses it."""
from __future__ import annotations

import gzip
import warnings
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from .errors import DiffusionMICWarning

_NIFTI = (".nii", ".nii.gz")
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
_ITU_R_601 = (0.299, 0.587, 0.114)      # luminance weights of R, G, B (as PIL's convert("L"))


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(_NIFTI)


def _decompressed_size(path: Path) -> int | None:
    """Bytes in a complete gzip stream; None if the stream ends early or is corrupt."""
    total = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                total += len(chunk)
    except (EOFError, OSError, zlib.error):
        return None
    return total


def nifti_damage(path: Path) -> str | None:
    """Why a NIfTI file's voxel data is incomplete, or None when it is whole (or not NIfTI at all).

    SimpleITK fills a truncated NIfTI with zeros without a word, so the data size is checked
    against the header (nibabel) first.
    """
    with open(path, "rb") as f:
        compressed = f.read(2) == b"\x1f\x8b"       # the gzip magic number
    size = _decompressed_size(path) if compressed else path.stat().st_size
    if size is None:
        return "damaged file: its compressed data ends early or is corrupt (an incomplete download or copy?)"
    try:
        header = nib.load(str(path)).header
    except Exception:  # noqa: BLE001 - any header problem is SimpleITK's to report
        return None
    expected = int(header.get_data_offset()) + int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
    if size < expected:
        return f"damaged file: it holds {size} bytes where its header announces {expected} (truncated?)"
    return None


def read_sheared_nifti(path: Path, label: str) -> sitk.Image | None:
    """A NIfTI whose affine has shear (SimpleITK refuses it), on the nearest orthonormal direction,
    with a DiffusionMICWarning saying how far voxels move; None if nibabel cannot read it either."""
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except Exception:  # noqa: BLE001 - then it is not a readable image at all
        return None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim not in (2, 3):
        return None
    data = np.atleast_3d(data)
    affine = np.asarray(image.affine, dtype=np.float64)
    matrix = _RAS_TO_LPS @ affine[:3, :3]
    spacing = np.linalg.norm(matrix, axis=0)
    u, _, vt = np.linalg.svd(matrix / spacing)
    direction = u @ vt                    # the orthonormal matrix nearest the affine's axes (polar decomposition)
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in data.shape], indexing="ij")).reshape(3, -1)
    moved = float(np.max(np.linalg.norm((matrix - direction * spacing) @ corners, axis=0)))
    out = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    out.SetSpacing(spacing.tolist())
    out.SetOrigin((_RAS_TO_LPS @ affine[:3, 3]).tolist())
    out.SetDirection(direction.ravel().tolist())
    warnings.warn(f"'{label}': the NIfTI affine has shear; read on the nearest orthonormal grid "
                  f"(voxels move by up to {moved:.1f} mm)", DiffusionMICWarning, stacklevel=3)
    return out


def is_radiograph(image: sitk.Image) -> bool:
    """A single DICOM frame with no position in the patient (CR, DX: a projection, a 2D image)."""
    return image.HasMetaDataKey("0008|0060") and not image.HasMetaDataKey("0020|0032") \
        and image.GetDimension() == 3 and image.GetSize()[2] == 1


def as_3d(image: sitk.Image) -> sitk.Image:
    """A 2D image as a one-slice 3D image on the same in-plane grid (z spacing 1 mm); colour
    (RGB, RGBA) becomes luminance."""
    if image.GetNumberOfComponentsPerPixel() in (3, 4):
        channels = [sitk.VectorIndexSelectionCast(image, i, sitk.sitkFloat32) for i in range(3)]
        image = sum((w * c for w, c in zip(_ITU_R_601[1:], channels[1:])), _ITU_R_601[0] * channels[0])
    return sitk.JoinSeries(image)
