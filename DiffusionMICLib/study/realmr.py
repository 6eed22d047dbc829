"""Real MR images that ship inside installable packages, for the study's real-data tables, and
others (never the same scans) that a denoiser may train on.

Each is optional: a source whose package (or Debian's insighttoolkit5-examples) is not installed
is skipped and the study says which it used. All are magnitude images with their own acquisition
noise; the study adds Rician noise on top and takes the image as given as the reference.
"""
from __future__ import annotations

import importlib.util
import json
import os
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from ..datasets import Dataset
from ..volume import Geometry, Volume, onto_grid, read_volume, spacing_grid, write_volume

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


def _itk_image(name: str) -> Volume | None:
    path = ITK_DATA / name
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
    path = _package_file("data_store", "data", "emri_small.dcm")
    if path is None:
        return None
    image = sitk.ReadImage(str(path))
    return _array_volume(sitk.GetArrayFromImage(image), (1.0, 1.0, 1.0))


SOURCES: dict[str, tuple[str, Callable[[], Volume | None]]] = {
    "itk-t1": ("T1 head volume, 128 x 128 x 62 at 2 x 2 x 3 mm (Debian insighttoolkit5-examples)",
               partial(_itk_image, "KmeansTest_T1UCharRaw.nii.gz")),
    "dipy-t1": ("T1 coronal slice, 256 x 256 (dipy wheel)", _dipy_t1_slice),
    "dipy-b0": ("b = 0 (T2-weighted) brain, 128 x 128 x 10 at 2 mm (dipy wheel)", _dipy_b0),
    "pydicom-head": ("head MR, 10 x 64 x 64 (pydicom-data)", _pydicom_head),
}


def _found(sources: dict[str, tuple[str, Callable[[], Volume | None]]]) -> dict[str, tuple[str, Volume]]:
    found = {}
    for name, (description, load) in sources.items():
        try:
            volume = load()
        except Exception:   # noqa: BLE001 - a package's file that fails to read is skipped like a missing one
            volume = None
        if volume is not None:
            found[name] = (description, volume)
    return found


def real_mr() -> dict[str, tuple[str, Volume]]:
    """The real MR images found on this machine: name -> (description, volume)."""
    return _found(SOURCES)


# ---- training images: real anatomy (skull, scalp, fat, fine detail), none of them a test scan above or
# another view of one (dipy's aniso_vox / ascm_out_test may be S0_10slices' subject: left out) --------

def _pydicom_image(name: str, spacing_mm: float | None = None) -> Volume | None:
    """A pydicom-data image; with spacing_mm, resampled in-plane to it (anti-aliased)."""
    path = _package_file("data_store", "data", name)
    if path is None:
        return None
    volume = read_volume(path)
    volume = volume.with_array(volume.array.astype(np.float32))
    if spacing_mm is None:
        return volume
    grid = spacing_grid(volume.geometry, (spacing_mm, spacing_mm, volume.geometry.spacing[2]))
    return Volume(onto_grid(volume, grid), grid)


TRAINING_SOURCES: dict[str, tuple[str, Callable[[], Volume | None]]] = {
    "itk-brainweb-t1": ("BrainWeb T1 axial slice with skull and scalp, 217 x 181 (ITK examples)",
                        partial(_itk_image, "BrainT1Slice.png")),
    "itk-brainweb-pd": ("BrainWeb PD axial slice, 217 x 181 (ITK examples)", partial(_itk_image, "BrainProtonDensitySlice.png")),
    "itk-sagittal": ("mid-sagittal head slice, 217 x 180 (ITK examples)", partial(_itk_image, "BrainMidSagittalSlice.png")),
    "itk-complex": ("axial head slice, magnitude of complex MR data, 217 x 181 (ITK examples)",
                    partial(_itk_image, "itkBrainSliceComplexMagnitude.mha")),
    "pydicom-shoulder": ("shoulder MR, 1024 x 1024 at 0.2 mm resampled to 0.8 mm (pydicom-data MR2_UNCR)",
                         partial(_pydicom_image, "MR2_UNCR.dcm", 0.78125)),
    "pydicom-abdomen": ("abdominal MR, 484 x 484 at 0.72 mm (pydicom-data MR-SIEMENS-DICOM-WithOverlays)",
                        partial(_pydicom_image, "MR-SIEMENS-DICOM-WithOverlays.dcm")),
}


def real_mr_training() -> dict[str, tuple[str, Volume]]:
    """The real training images found on this machine: name -> (description, volume)."""
    return _found(TRAINING_SOURCES)


def training_set_with_real(dataset: Dataset, case_ids: list[str], out: Path) -> list[str]:
    """An nnU-Net folder `out` with the data set's cases `case_ids` (imagesTr and cleanTr, linked) and
    every real training image as one more case, returned by id. A real case's image is its own clean
    target (as the study's real references are) and stands in for every channel: a denoiser treats
    each channel alike, so each real image is drawn as often as one phantom channel-volume."""
    ending = ".nii.gz"
    for folder in ("imagesTr", "cleanTr"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    channels = dataset.channels
    for case in dataset.cases:
        if case.id not in case_ids:
            continue
        for i, name in enumerate(channels):
            for folder, ref in (("imagesTr", case.images[name]), ("cleanTr", case.variants["cleanTr"][name])):
                link = out / folder / f"{case.id}_{i:04d}{ending}"
                if not link.exists():
                    os.symlink(ref.path.resolve(), link)
    real_ids, images = [], real_mr_training()
    for name, (_, volume) in images.items():
        cid = "real_" + name.replace("-", "_")
        for folder in ("imagesTr", "cleanTr"):
            for i in range(len(channels)):
                path = out / folder / f"{cid}_{i:04d}{ending}"
                if not path.exists():
                    write_volume(volume, path)
        real_ids.append(cid)
    meta = {"name": f"{dataset.root.name} + real MR", "channel_names": {str(i): c for i, c in enumerate(channels)},
            "labels": dataset.labels, "numTraining": len(case_ids) + len(real_ids), "file_ending": ending,
            "real_training_images": {k: d for k, (d, _) in images.items()}}
    (out / "dataset.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return real_ids
