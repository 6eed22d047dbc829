"""Real MR images that ship inside installable packages, for the study's real-data tables.

Each is optional: a source whose package (or Debian's insighttoolkit5-examples) is not installed
is skipped and the study says which it used. All are magnitude images with their own acquisition
noise; the study adds Rician noise on top and takes the image as given as the reference.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from ..volume import Geometry, Volume, read_volume

ITK_DATA = Path("/usr/share/doc/insighttoolkit5-examples/examples/Data")


def _package_file(package: str, *parts: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0], *parts)
    return path if path.is_file() else None


def _array_volume(array: np.ndarray, spacing: tuple[float, float, float]) -> Volume:
    a = np.asarray(array, np.float32)
    a = a[None] if a.ndim == 2 else a
    geometry = Geometry(size=tuple(int(s) for s in a.shape[::-1]), spacing=tuple(float(s) for s in spacing),
                        origin=(0.0, 0.0, 0.0), direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    return Volume(np.ascontiguousarray(a), geometry)


def _itk_t1() -> Volume | None:
    path = ITK_DATA / "KmeansTest_T1UCharRaw.nii.gz"
    return read_volume(path) if path.is_file() else None


def _dipy_t1_slice() -> Volume | None:
    path = _package_file("dipy", "data", "files", "t1_coronal_slice.npy")
    return _array_volume(np.load(path), (1.0, 1.0, 1.0)) if path else None


def _dipy_b0() -> Volume | None:
    """dipy's S0_10slices (b = 0, T2-weighted): its affine is sheared, so only the array and voxel size are kept."""
    path = _package_file("dipy", "data", "files", "S0_10slices.nii.gz")
    if path is None:
        return None
    import nibabel
    image = nibabel.load(str(path))
    a = np.asarray(image.dataobj, np.float32).reshape(image.shape[:3])
    return _array_volume(np.transpose(a, (2, 1, 0)), tuple(float(z) for z in image.header.get_zooms()[:3]))


def _pydicom_head() -> Volume | None:
    """pydicom-data's emri_small.dcm: 10 frames of a 64 x 64 head MR."""
    spec = importlib.util.find_spec("data_store")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0], "data", "emri_small.dcm")
    if not path.is_file():
        return None
    image = sitk.ReadImage(str(path))
    return _array_volume(sitk.GetArrayFromImage(image), (1.0, 1.0, 1.0))


SOURCES: dict[str, tuple[str, Callable[[], Volume | None]]] = {
    "itk-t1": ("T1 head volume, 128 x 128 x 62 at 2 x 2 x 3 mm (Debian insighttoolkit5-examples)", _itk_t1),
    "dipy-t1": ("T1 coronal slice, 256 x 256 (dipy wheel)", _dipy_t1_slice),
    "dipy-b0": ("b = 0 (T2-weighted) brain, 128 x 128 x 10 at 2 mm (dipy wheel)", _dipy_b0),
    "pydicom-head": ("head MR, 10 x 64 x 64 (pydicom-data)", _pydicom_head),
}


def real_mr() -> dict[str, tuple[str, Volume]]:
    """The real MR images found on this machine: name -> (description, volume)."""
    found = {}
    for name, (description, load) in SOURCES.items():
        try:
            volume = load()
        except Exception:   # noqa: BLE001 - a package's file that fails to read is skipped like a missing one
            volume = None
        if volume is not None:
            found[name] = (description, volume)
    return found
