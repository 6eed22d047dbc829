"""Tests of DiffusionMICLib.volume: exact geometry through I/O, MONAI, reorientation, resampling."""
import os
import warnings

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.transforms import LoadImage
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from DiffusionMICLib.volume import (Geometry, Volume, VolumeError, from_metatensor, orient,
                                    read_volume, resample_spacing, resample_to, to_metatensor,
                                    to_tensor, write_volume)


def rotation(deg_x: float, deg_z: float) -> tuple[float, ...]:
    ax, az = np.radians(deg_x), np.radians(deg_z)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return tuple((rz @ rx).ravel().tolist())


def make_volume(dtype=np.float32, direction=rotation(20, 20), seed=0) -> Volume:
    """Oblique, anisotropic, non-cubic, off-origin volume of random values."""
    rng = np.random.default_rng(seed)
    geometry = Geometry((7, 6, 5), (0.7, 1.1, 2.5), (-12.5, 30.25, 7.75), direction)
    array = (rng.normal(size=(5, 6, 7)) * 100).astype(dtype)
    return Volume(array, geometry)


def physical_values(volume: Volume, points) -> np.ndarray:
    image = volume.to_sitk()
    return np.array([image[image.TransformPhysicalPointToIndex(p)] for p in points])


@pytest.mark.parametrize("ext", [".nrrd", ".nii", ".nii.gz", ".mha"])
def test_round_trip_every_format(tmp_path, ext):
    tol = 1e-4 if ext.startswith(".nii") else 1e-5   # NIfTI stores its matrix as float32
    for dtype in (np.float32, np.int16):
        volume = make_volume(dtype)
        path = write_volume(volume, tmp_path / f"v{ext}")
        assert path == tmp_path / f"v{ext}"
        back = read_volume(path)
        assert back.geometry.same_as(volume.geometry, tol=tol)
        assert back.array.dtype == dtype
        np.testing.assert_array_equal(back.array, volume.array)
    assert sorted(os.listdir(tmp_path)) == [f"v{ext}"]   # no temporary file left


def test_nrrd_is_exact_and_folders_are_made(tmp_path):
    volume = make_volume()
    back = read_volume(write_volume(volume, tmp_path / "a" / "b" / "v.nrrd"))
    assert back.geometry.same_as(volume.geometry, tol=1e-12)
    mask = read_volume(write_volume(volume.with_array(volume.array > 0), tmp_path / "m.nrrd"))
    np.testing.assert_array_equal(mask.array, volume.array > 0)
    assert mask.array.dtype == np.uint8


def test_geometry_dict_and_affine():
    g = make_volume().geometry
    assert Geometry.from_dict(g.to_dict()) == g
    affine = g.ras_affine()
    image = make_volume().to_sitk()
    lps = image.TransformContinuousIndexToPhysicalPoint((2.0, 3.0, 4.0))
    np.testing.assert_allclose(affine @ [2, 3, 4, 1], [-lps[0], -lps[1], lps[2], 1], atol=1e-12)
    assert Geometry.from_ras_affine(affine, g.size).same_as(g, tol=1e-12)


def test_with_array_and_tensor():
    volume = make_volume()
    assert volume.with_array(volume.array * 2).geometry == volume.geometry
    with pytest.raises(VolumeError):
        volume.with_array(volume.array.transpose(2, 1, 0))
    tensor = to_tensor(make_volume(np.int16))
    assert tensor.dtype == torch.float32 and tensor.shape == (1, 5, 6, 7)
    np.testing.assert_array_equal(tensor[0].numpy(), make_volume(np.int16).array)


@pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader")
def test_metatensor_matches_monai_load_image(tmp_path):
    volume = make_volume()
    path = write_volume(volume, tmp_path / "v.nii.gz")
    loaded = LoadImage(image_only=True, ensure_channel_first=True)(str(path))
    mt = to_metatensor(read_volume(path))
    assert mt.shape == loaded.shape == (1, 7, 6, 5)
    np.testing.assert_array_equal(mt.numpy(), loaded.numpy())
    np.testing.assert_allclose(mt.affine.numpy(), loaded.affine.numpy(), atol=1e-4)
    np.testing.assert_allclose(mt.affine.numpy(), volume.geometry.ras_affine(), atol=1e-4)


def test_metatensor_round_trip_is_exact():
    for volume in (make_volume(), make_volume(direction=(0, 1, 0, 0, 0, -1, -1, 0, 0))):
        back = from_metatensor(to_metatensor(volume))
        assert back.geometry.same_as(volume.geometry, tol=1e-12)
        np.testing.assert_array_equal(back.array, volume.array)
    labels = make_volume(np.int16)
    assert from_metatensor(to_metatensor(labels, dtype=None)).array.dtype == np.int16


def test_orient_axis_aligned():
    volume = make_volume(direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert orient(volume, "LPS").geometry.same_as(volume.geometry, tol=0)
    ras = orient(volume, "RAS")
    assert ras.direction == (-1, 0, 0, 0, -1, 0, 0, 0, 1)
    np.testing.assert_array_equal(ras.array, volume.array[:, ::-1, ::-1])
    ras_image, image = ras.to_sitk(), volume.to_sitk()
    point = image.TransformIndexToPhysicalPoint((1, 2, 3))
    assert ras_image[ras_image.TransformPhysicalPointToIndex(point)] == image[1, 2, 3]
    # letters name where the axes point: x toward Right, y toward Inferior, z toward Anterior
    ria = orient(volume, "RIA")
    np.testing.assert_allclose(np.reshape(ria.direction, (3, 3)).T,
                               [[-1, 0, 0], [0, 0, -1], [0, -1, 0]], atol=0)
    with pytest.raises(ValueError):
        orient(volume, "RAR")


def test_orient_oblique_round_trip():
    volume = make_volume()
    ras = orient(volume, "RAS")
    direction = np.reshape(ras.direction, (3, 3))
    assert np.all(np.diag(direction) * [-1, -1, 1] > 0.8)   # closest axes to R, A, S
    # every voxel centre of the input holds the same value in the reoriented volume
    image = volume.to_sitk()
    points = [image.TransformIndexToPhysicalPoint(tuple(int(i) for i in idx))
              for idx in np.ndindex(*volume.size)]
    np.testing.assert_array_equal(physical_values(ras, points),
                                  volume.array.transpose(2, 1, 0).ravel())
    code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(volume.direction)
    back = orient(ras, code)
    assert back.geometry.same_as(volume.geometry, tol=1e-12)
    np.testing.assert_array_equal(back.array, volume.array)
    np.testing.assert_array_equal(resample_to(ras, volume.geometry, interpolation="nearest").array,
                                  volume.array)


def test_acquired_slices_put_the_thickest_axis_first_and_go_back_exactly():
    from DiffusionMICLib.engine.space import ACQUIRED, ModelSpace
    rng = np.random.default_rng(0)
    array = rng.random((5, 6, 7)).astype(np.float32)        # (z, y, x); y has 3 mm voxels
    volume = Volume(array, Geometry((7, 6, 5), (2.0, 3.0, 2.0), (1.0, 2.0, 3.0), (0, 0, 1, 1, 0, 0, 0, 1, 0)))
    space = ModelSpace.enter([volume], ACQUIRED)
    np.testing.assert_array_equal(space.arrays[0], array.transpose(1, 0, 2))   # slices along y
    assert space.model_grid.geometry.spacing == (2.0, 2.0, 3.0)
    back = space.leave(space.arrays[0])
    assert back.geometry.same_as(volume.geometry, tol=1e-9)
    np.testing.assert_allclose(back.array, array, atol=1e-6)
    iso = Volume(array, Geometry((7, 6, 5), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)))
    np.testing.assert_array_equal(ModelSpace.enter([iso], ACQUIRED).arrays[0], array)   # ties: stored slices
    image = Volume(array[:1], Geometry((7, 6, 1), (2.0, 2.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)))
    np.testing.assert_array_equal(ModelSpace.enter([image], ACQUIRED).arrays[0], array[:1])   # one image: its slice


def test_resample_to_own_grid_and_spacing():
    volume = make_volume()
    same = resample_to(volume, volume.geometry)
    assert same.geometry == volume.geometry
    np.testing.assert_allclose(same.array, volume.array, atol=1e-3)
    nearest = resample_to(volume, volume.geometry, interpolation="nearest")
    np.testing.assert_array_equal(nearest.array, volume.array)
    coarse = resample_spacing(volume, (1.4, 2.2, 1.25))
    assert coarse.size == (4, 3, 10)
    assert coarse.origin == volume.origin and coarse.direction == volume.direction
    extent = np.multiply(coarse.size, coarse.spacing)
    np.testing.assert_allclose(extent, np.multiply(volume.size, volume.spacing), atol=1.25)
    with pytest.raises(ValueError):
        resample_to(volume, volume.geometry, interpolation="cubic-ish")


def position(image: sitk.Image, k: int) -> str:
    return "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k)))


def write_dicom_series(volume: Volume, folder, uid: str, order) -> None:
    """One file per slice with the tags a reader needs to rebuild the geometry."""
    folder.mkdir(exist_ok=True)
    image = volume.to_sitk()
    direction = np.reshape(volume.direction, (3, 3))
    orientation = "\\".join(f"{v:.9f}" for v in (*direction[:, 0], *direction[:, 1]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in order:
        slice_ = image[:, :, k]
        for tag, value in [("0008|0060", "CT"), ("0020|000d", uid + ".1"), ("0020|000e", uid),
                           ("0008|0018", f"{uid}.{k + 10}"), ("0020|0037", orientation),
                           ("0020|0013", str(k + 1)), ("0028|0030", "1.1\\0.7"),
                           ("0020|0032", position(image, k))]:
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{uid[-1]}-{(k * 7) % 11:02d}.dcm"))
        writer.Execute(slice_)


def test_dicom_series_folder(tmp_path):
    volume = make_volume(np.int16)
    other = make_volume(np.int16, seed=1)
    write_dicom_series(other, tmp_path / "dicom", "1.2.826.0.1.3680043.2.1125.1", [0, 1])  # fewer
    write_dicom_series(volume, tmp_path / "dicom", "1.2.826.0.1.3680043.2.1125.2", [3, 0, 4, 2, 1])
    back = read_volume(tmp_path / "dicom")
    assert back.geometry.same_as(volume.geometry, tol=1e-5)
    np.testing.assert_array_equal(back.array, volume.array)


def assert_one_line_error(path, match: str):
    with pytest.raises(VolumeError, match=match) as info:
        read_volume(path)
    message = str(info.value)
    assert "\n" not in message and os.path.basename(path) in message
    return message


def test_bad_inputs(tmp_path):
    four_d = sitk.Image([4, 4, 4, 3], sitk.sitkFloat32)
    sitk.WriteImage(four_d, str(tmp_path / "4d.nii.gz"))
    assert "4x4x4x3" in assert_one_line_error(tmp_path / "4d.nii.gz", "4D image")
    sitk.WriteImage(sitk.Image([4, 4, 4, 1], sitk.sitkFloat32), str(tmp_path / "4d1.nrrd"))
    assert read_volume(tmp_path / "4d1.nrrd").size == (4, 4, 4)   # trailing size-1 axis dropped
    sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkVectorUInt8, 3), str(tmp_path / "rgb.nrrd"))
    assert_one_line_error(tmp_path / "rgb.nrrd", "3 components")
    sitk.WriteImage(sitk.Image([4, 4, 4, 2, 2], sitk.sitkFloat32), str(tmp_path / "5d.nii"))
    assert_one_line_error(tmp_path / "5d.nii", "5D image")
    nan = make_volume()
    nan.array[1, 2, 3] = np.nan
    nan.array[0, 0, 0] = np.inf
    write_volume(nan, tmp_path / "nan.nrrd")
    assert_one_line_error(tmp_path / "nan.nrrd", "2 voxels are NaN")
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    assert_one_line_error(tmp_path / "empty.nii.gz", "empty file")
    (tmp_path / "text.nii.gz").write_text("not an image\n", encoding="utf-8")
    assert_one_line_error(tmp_path / "text.nii.gz", "not a readable image")
    assert_one_line_error(tmp_path / "missing.nrrd", "no such file")
    with pytest.raises(VolumeError, match="'T1 input': no such file"):
        read_volume(tmp_path / "missing.nrrd", name="T1 input")
    (tmp_path / "no_dicom").mkdir()
    assert_one_line_error(tmp_path / "no_dicom", "holds no DICOM series")


def test_write_refuses_unknown_extension(tmp_path):
    with pytest.raises(VolumeError, match="unsupported") as info:
        write_volume(make_volume(), tmp_path / "sub" / "v.png")
    assert "v.png" in str(info.value) and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    target = tmp_path / "v.nii.gz"
    target.write_bytes(b"old contents")

    def broken_write(image, filename, useCompression=False):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("Exception thrown in WriteImage\nITK ERROR: disk full")

    monkeypatch.setattr(sitk, "WriteImage", broken_write)
    with pytest.raises(VolumeError, match="disk full") as info:
        write_volume(make_volume(), target)
    assert "v.nii.gz" in str(info.value) and "\n" not in str(info.value)
    assert target.read_bytes() == b"old contents"
    assert sorted(os.listdir(tmp_path)) == ["v.nii.gz"]
    with pytest.raises(VolumeError):
        write_volume(make_volume(), tmp_path / "new.nrrd")
    assert sorted(os.listdir(tmp_path)) == ["v.nii.gz"]


@pytest.mark.parametrize("name", ["v.nii.gz", "v.nii"])
def test_truncated_nifti_is_refused(tmp_path, name):
    whole = write_volume(make_volume(), tmp_path / name)
    assert read_volume(whole).size == (7, 6, 5)
    data = whole.read_bytes()
    cut = tmp_path / f"cut-{name}"
    cut.write_bytes(data[: len(data) // 3])
    sitk.ReadImage(str(cut))       # SimpleITK alone reads it, zero-filled past the cut
    assert "damaged file" in assert_one_line_error(cut, "damaged file")


def test_sheared_nifti_is_read_on_the_nearest_orthonormal_grid(tmp_path):
    affine = np.array([[2.0, 0, 0.6, -10], [0, 2, 0.4, -20], [0, 0, 3, 5], [0, 0, 0, 1]])   # RAS, with shear
    data = np.arange(6 * 7 * 5, dtype=np.int16).reshape(6, 7, 5)                           # (i, j, k)
    path = tmp_path / "sheared.nii.gz"
    nib.Nifti1Image(data, affine).to_filename(path)
    with pytest.raises(RuntimeError, match="orthonormal"):
        sitk.ReadImage(str(path))
    with pytest.warns(UserWarning, match="shear.*nearest orthonormal grid.*up to") as caught:
        volume = read_volume(path)
    assert len(caught) == 1 and "sheared.nii.gz" in str(caught[0].message)
    np.testing.assert_array_equal(volume.array, data.transpose(2, 1, 0))
    d = np.reshape(volume.direction, (3, 3))
    np.testing.assert_allclose(d @ d.T, np.eye(3), atol=1e-9)
    np.testing.assert_allclose(volume.origin, (10, 20, 5))                 # LPS of the RAS translation
    assert volume.spacing[:2] == pytest.approx((2, 2)) and volume.spacing[2] == pytest.approx(np.sqrt(9.52))


def write_radiograph(path, array: np.ndarray, spacing=(0.5, 0.4)) -> None:
    """A 2D DICOM (computed radiography: no position in the patient), uint16."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"       # CR Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientName, ds.PatientID = "CR", "Phantom", "0"
    ds.Rows, ds.Columns = array.shape
    ds.ImagerPixelSpacing = list(spacing)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = array.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_2d_images_are_one_planar_slice_and_written_back_as_2d(tmp_path):
    rng = np.random.default_rng(0)
    gray = (rng.random((30, 40)) * 255).astype(np.uint8)
    image = sitk.GetImageFromArray(gray.astype(np.float32))
    image.SetSpacing((0.7, 0.9))
    image.SetOrigin((-3.0, 4.0))
    image.SetDirection((0.0, 1.0, 1.0, 0.0))
    sitk.WriteImage(image, str(tmp_path / "slice.nrrd"))
    Image.fromarray(gray).save(tmp_path / "gray.png")
    rgb = np.stack([gray, gray // 2, 255 - gray], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    write_radiograph(tmp_path / "cr.dcm", gray.astype(np.uint16) * 4)

    nrrd = read_volume(tmp_path / "slice.nrrd")
    assert nrrd.planar and nrrd.size == (40, 30, 1) and nrrd.spacing[:2] == (0.7, 0.9)
    assert nrrd.origin[:2] == (-3.0, 4.0) and nrrd.direction == (0, 1, 0, 1, 0, 0, 0, 0, 1)
    np.testing.assert_array_equal(read_volume(tmp_path / "gray.png").array[0], gray)
    colour = read_volume(tmp_path / "colour.png")
    np.testing.assert_allclose(colour.array[0], 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2],
                               atol=1e-3)
    cr = read_volume(tmp_path / "cr.dcm")
    assert cr.planar and cr.size == (40, 30, 1) and cr.spacing[:2] == (0.4, 0.5)
    np.testing.assert_array_equal(cr.array[0], gray.astype(np.uint16) * 4)

    back = sitk.ReadImage(str(write_volume(nrrd.with_array(nrrd.array * 2), tmp_path / "out.nrrd")))
    assert back.GetDimension() == 2 and back.GetSize() == (40, 30)
    assert (back.GetSpacing(), back.GetOrigin(), back.GetDirection()) == (image.GetSpacing(), image.GetOrigin(),
                                                                         image.GetDirection())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), gray * 2.0)
    one_slice = Volume(np.zeros((1, 3, 4), np.float32), Geometry((4, 3, 1), (1, 1, 1), (0, 0, 0), tuple(np.eye(3).ravel())))
    assert sitk.ReadImage(str(write_volume(one_slice, tmp_path / "slab.nrrd"))).GetDimension() == 3
