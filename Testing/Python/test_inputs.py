"""Real files through `diffusion-mic run` with the bundled models: 2D images, inputs on other
grids, step counts the schedule cannot take, inputs unlike the training data, .seg.nrrd output."""
import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from PIL import Image
from scipy import ndimage

from DiffusionMICLib.cli import main
from DiffusionMICLib.engine.network import build_network, network_config
from DiffusionMICLib.inputs import align_inputs
from DiffusionMICLib.models import ModelCard, save_model
from DiffusionMICLib.volume import Geometry, Volume, read_volume
from test_volume import write_radiograph

SLAB = slice(44, 50)     # six axial slices through the phantom's lesions: a quick run


@pytest.fixture(scope="module")
def subject(heldout_dir) -> dict[str, sitk.Image]:
    """The held-out phantom subject's images (T1, T2, PD, FLAIR) and labels, cut to a slab."""
    names = {"T1": "0000", "T2": "0001", "PD": "0002", "FLAIR": "0003"}
    images = {n: sitk.ReadImage(str(heldout_dir / "imagesTr" / f"phantom_000_{c}.nii.gz"))[:, :, SLAB]
              for n, c in names.items()}
    images["labels"] = sitk.ReadImage(str(heldout_dir / "labelsTr" / "phantom_000.nii.gz"))[:, :, SLAB]
    return images


def run(capsys, *args: str) -> tuple[int, dict | None, str]:
    code = main(["run", *args, "--progress", "none"])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetDimension() == b.GetDimension() and a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing()) and np.allclose(a.GetOrigin(), b.GetOrigin())
            and np.allclose(a.GetDirection(), b.GetDirection()))


def test_2d_images_run_through_a_2d_model_as_one_slice(subject, tmp_path, capsys):
    t1 = subject["T1"][:, :, 3]                                     # a 2D image, 88 x 104
    sitk.WriteImage(t1, str(tmp_path / "t1.nrrd"))
    scaled = sitk.GetArrayFromImage(t1) / float(np.percentile(sitk.GetArrayFromImage(t1), 99.9))
    Image.fromarray((np.clip(scaled, 0, 1) * 255).astype(np.uint8)).save(tmp_path / "t1.png")
    write_radiograph(tmp_path / "t1.dcm", np.clip(scaled, 0, 1) * 4000, spacing=(2.0, 2.0))
    for name in ("t1.nrrd", "t1.png", "t1.dcm"):
        out = tmp_path / f"denoised-{name}.nrrd"
        code, printed, err = run(capsys, "denoise", "--model", "brain-mri-denoise", "--input", str(tmp_path / name),
                                 "--output", str(out), "--steps", "2")
        assert code == 0, err
        assert printed["warnings"] == [] and printed["resampled"] == []
        source, result = sitk.ReadImage(str(tmp_path / name)), sitk.ReadImage(str(out))
        if name.endswith(".dcm"):                                  # a radiograph reads as one 3D slice
            source = source[:, :, 0]
        assert result.GetDimension() == 2 and same_grid(result, source), name
        before, after = sitk.GetArrayFromImage(source).astype(float), sitk.GetArrayFromImage(result)
        assert np.isfinite(after).all() and np.corrcoef(before.ravel(), after.ravel())[0, 1] > 0.9, name

    # a model of 3D patches cannot take a 2D image
    card = ModelCard(name="tiny-3d", task="denoise", inputs=["noisy"], outputs=["clean"],
                     network=network_config(2, 1, spatial_dims=3, channels=[16, 16], attention_levels=[False, False],
                                            norm_num_groups=16, num_head_channels=16),
                     schedule={"num_train_timesteps": 1000}, patch=[16, 16, 16])
    save_model(tmp_path / "tiny-3d", card, build_network(card.network))
    code, _, err = run(capsys, "denoise", "--model", str(tmp_path / "tiny-3d"), "--input", str(tmp_path / "t1.png"),
                       "--output", str(tmp_path / "3d.nrrd"))
    assert code == 2 and "2D image" in err and "3D model" in err and not (tmp_path / "3d.nrrd").exists()


def test_inputs_on_other_grids_are_resampled_onto_the_first(subject, tmp_path, capsys):
    t1, t2 = subject["T1"], subject["T2"]
    sitk.WriteImage(t1, str(tmp_path / "t1.nii.gz"))
    sitk.WriteImage(t2, str(tmp_path / "t2.nii.gz"))
    # T2 as another scan would give it: 1.5 x 1.5 x 3 mm, its grid shifted by half a voxel
    shifted = [o + 0.75 for o in t2.GetOrigin()]
    size = [int(n * s / t) + 2 for n, s, t in zip(t2.GetSize(), t2.GetSpacing(), (1.5, 1.5, 3.0))]
    other = sitk.Resample(t2, size, sitk.Transform(), sitk.sitkLinear, shifted, (1.5, 1.5, 3.0), t2.GetDirection())
    sitk.WriteImage(other, str(tmp_path / "t2-other.nii.gz"))
    args = ["translate", "--model", "brain-mri-t1t2-to-flair", "--steps", "2", "--input", str(tmp_path / "t1.nii.gz")]

    code, same, err = run(capsys, *args, "--input", str(tmp_path / "t2.nii.gz"), "--output", str(tmp_path / "a.nrrd"))
    assert code == 0, err
    assert same["resampled"] == []
    code, printed, err = run(capsys, *args, "--input", str(tmp_path / "t2-other.nii.gz"),
                             "--output", str(tmp_path / "b.nrrd"))
    assert code == 0, err
    [record] = printed["resampled"]
    assert record["input"] == 2 and record["interpolation"] == "linear" and record["spacing"] == [1.5, 1.5, 3.0]
    assert 0.5 < record["overlap"] <= 1.0
    a, b = (sitk.ReadImage(str(tmp_path / f"{n}.nrrd")) for n in "ab")
    assert same_grid(b, t1)                                         # on exactly the first input's grid
    a, b = sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b)
    brain = sitk.GetArrayFromImage(subject["labels"]) > 0
    assert np.corrcoef(a[brain], b[brain])[0, 1] > 0.8              # the same anatomy, found in physical space

    far = sitk.Image(other)
    far.SetOrigin([o + 1000.0 for o in other.GetOrigin()])
    sitk.WriteImage(far, str(tmp_path / "t2-far.nii.gz"))
    code, _, err = run(capsys, *args, "--input", str(tmp_path / "t2-far.nii.gz"), "--output", str(tmp_path / "c.nrrd"))
    assert code == 2 and "input 2 does not overlap input 1" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c.nrrd").exists()


def test_label_maps_are_resampled_by_nearest_neighbour():
    grid = Geometry((8, 8, 4), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    image = Volume(np.random.default_rng(0).random((4, 8, 8), dtype=np.float32), grid)
    labels = Volume((np.arange(8 * 8 * 4) // 64).astype(np.uint8).reshape(8, 8, 4) * 10,
                    Geometry((4, 8, 8), (2.0, 1.0, 1.0), (0.3, 0.2, -1.0), tuple(np.eye(3).ravel())))
    (first, moved), [record] = align_inputs([image, labels])
    assert first is image and moved.geometry == grid and record["interpolation"] == "nearest"
    assert set(np.unique(moved.array)) <= {0, 10, 20, 30} and len(np.unique(moved.array)) > 2


def test_step_counts_the_schedule_cannot_take_are_refused(subject, tmp_path, capsys):
    sitk.WriteImage(subject["FLAIR"], str(tmp_path / "flair.nrrd"))
    for model, steps, most in (("brain-mri-anomaly", "100000", "1000"), ("brain-mri-denoise", "5", "4")):
        code, _, err = run(capsys, "anomaly" if "anomaly" in model else "denoise", "--model", model,
                           "--input", str(tmp_path / "flair.nrrd"), "--output", str(tmp_path / "x.nrrd"), "--steps", steps)
        assert code == 2 and f"--steps {steps} is too many" in err and f"at most {most}" in err
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x.nrrd").exists()


def test_an_input_unlike_the_training_data_is_run_with_warnings(subject, tmp_path, capsys):
    labels = sitk.GetArrayFromImage(subject["labels"])
    brain = labels > 0
    skull = ndimage.binary_dilation(brain, iterations=3) & ~brain
    ct = np.full(labels.shape, -1000.0, np.float32)                  # a CT-like head in Hounsfield units
    ct[skull] = 1200.0
    for value, hu in ((1, 8.0), (2, 40.0), (3, 28.0), (4, 35.0)):
        ct[labels == value] = hu
    ct += np.random.default_rng(0).normal(0, 5, ct.shape).astype(np.float32)
    t1 = subject["T1"]
    affine = Geometry.from_sitk(t1).ras_affine()
    affine[0, 2] += 0.2                                               # and a sheared affine, as some files hold
    nib.Nifti1Image(ct.transpose(2, 1, 0), affine).to_filename(tmp_path / "ct.nii.gz")
    code, printed, err = run(capsys, "denoise", "--model", "brain-mri-denoise", "--input", str(tmp_path / "ct.nii.gz"),
                             "--output", str(tmp_path / "ct-denoised.nrrd"), "--steps", "2")
    assert code == 0, err
    shear, intensities = printed["warnings"]
    assert "shear" in shear and "ct.nii.gz" in shear
    assert "input 1 (noisy)" in intensities and "far outside" in intensities and "brain-mri-denoise" in intensities
    assert err.count("diffusion-mic: warning: ") == 2
    assert read_volume(tmp_path / "ct-denoised.nrrd").size == t1.GetSize()


def test_segment_writes_a_slicer_segmentation_file(subject, tmp_path, capsys):
    inputs = []
    for name in ("T1", "T2", "PD", "FLAIR"):
        sitk.WriteImage(subject[name], str(tmp_path / f"{name}.nrrd"))
        inputs += ["--input", str(tmp_path / f"{name}.nrrd")]
    out = tmp_path / "labels.seg.nrrd"
    code, printed, err = run(capsys, "segment", "--model", "brain-mri-lesion-segment", *inputs, "--output", str(out))
    assert code == 0, err
    assert printed["outputs"] == {"output": str(out), "uncertainty": str(tmp_path / "labels-uncertainty.nrrd")}
    seg = slicerio.read_segmentation(str(out))
    assert [(s["name"], s["labelValue"]) for s in seg["segments"]] == [("CSF", 1), ("GM", 2), ("WM", 3), ("lesion", 4)]
    colours = [tuple(s["color"]) for s in seg["segments"]]
    assert len(set(colours)) == 4 and all(len(c) == 3 and all(0 <= v <= 1 for v in c) for c in colours)
    np.testing.assert_allclose(seg["ijkToLPS"], _ijk_to_lps(subject["T1"]), atol=1e-6)
    voxels = seg["voxels"]                                            # (i, j, k)
    assert voxels.shape == subject["T1"].GetSize()
    truth = sitk.GetArrayFromImage(subject["labels"]).transpose(2, 1, 0)
    assert set(np.unique(voxels)) <= {0, 1, 2, 3, 4}
    assert np.mean(voxels[truth == 3] == 3) > 0.7                     # white matter mostly found
    code, _, err = run(capsys, "denoise", "--model", "brain-mri-denoise", "--input", str(tmp_path / "T1.nrrd"),
                       "--output", str(tmp_path / "t1.seg.nrrd"))
    assert code == 2 and "only segment writes .seg.nrrd" in err


def _ijk_to_lps(image: sitk.Image) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = np.reshape(image.GetDirection(), (3, 3)) @ np.diag(image.GetSpacing())
    m[:3, 3] = image.GetOrigin()
    return m


def test_seg_nrrd_loads_in_slicer_as_a_segmentation_on_the_label_maps_grid(tmp_path):
    """Read back through slicer-core's real segmentation storage node (as Slicer loads a file)."""
    import slicer
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    from DiffusionMICLib.segfile import write_segmentation
    grid = Geometry((6, 5, 4), (0.7, 1.1, 2.5), (-12.5, 30.25, 7.75), (0, -1, 0, 1, 0, 0, 0, 0, 1))   # oblique axes
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1:3, 1:4, 2:5] = 2
    labels[0, 0, :2] = 1
    path = write_segmentation(Volume(labels, grid), tmp_path / "labels.seg.nrrd", {"background": 0, "CSF": 1, "GM": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["labels.seg.nrrd"]     # no temporary file left
    slicer.mrmlScene = slicer.vtkMRMLScene()
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    segmentation = node.GetSegmentation()
    segments = [segmentation.GetNthSegment(i) for i in range(segmentation.GetNumberOfSegments())]
    assert [s.GetName() for s in segments] == ["CSF", "GM"]
    assert segments[0].GetColor() != segments[1].GetColor()
    for segment, value in zip(segments, (1, 2)):
        labelmap = segment.GetRepresentation("Binary labelmap")
        matrix = vtk.vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(matrix)
        np.testing.assert_allclose([[matrix.GetElement(i, j) for j in range(4)] for i in range(4)], grid.ras_affine(),
                                   atol=1e-9)
        voxels = vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(labels.shape)
        np.testing.assert_array_equal(voxels == segment.GetLabelValue(), labels == value)
