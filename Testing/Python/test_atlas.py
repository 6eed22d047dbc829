"""Tissue out of place (DiffusionMICLib.atlas): the scoring on constructed probabilities, and the
bundled segmenter against registered healthy phantom subjects through `run anomaly --healthy`."""
import json

import numpy as np
import pytest

from DiffusionMICLib import phantom as P
from DiffusionMICLib.atlas import TissueAtlas, out_of_place
from DiffusionMICLib.cli import main as cli_main
from DiffusionMICLib.errors import DiffusionMICError
from DiffusionMICLib.volume import Volume, read_volume, write_volume

SEGMENTER = "brain-mri-lesion-segment"
CHANNELS = ("T1", "T2", "PD", "FLAIR")


def test_out_of_place_marks_tissue_where_the_cohort_has_none():
    """Constructed: a healthy cohort with grey matter (class 2) in the left half only, white matter
    (class 3) in the right; a case identical to it scores nothing, a case with a grey-matter block in
    the right half scores there and nowhere else (beyond the smoothing), outside the brain stays zero."""
    shape = (4, 12, 12)
    p = np.zeros((4, *shape), np.float32)                  # background, CSF, GM, WM
    p[2, :, :, :6], p[3, :, :, 6:] = 1.0, 1.0
    brain = np.ones(shape, bool)
    brain[:, 0, :] = False                                  # one row outside the brain
    assert np.allclose(out_of_place(p, [p, p], brain), 0.0)
    case = p.copy()
    case[2, :, 4:8, 8:11], case[3, :, 4:8, 8:11] = 1.0, 0.0    # grey matter out of place
    case[1, :, 0, :] = 1.0                                  # CSF outside the brain: not scored
    m = out_of_place(case, [p, p], brain)
    assert m[:, 5:7, 9].min() > 0.3 and m[:, 5:7, 2].max() < 0.01 and np.all(m[:, 0, :] == 0)
    assert np.unravel_index(np.argmax(m), m.shape)[1:] in {(5, 9), (6, 9), (5, 10), (6, 10)}


def slab(volume: Volume, z: slice) -> Volume:
    """Slices z of a volume, on the physical grid they had (subjects of the phantom share one grid)."""
    return Volume.from_sitk(volume.to_sitk()[:, :, z])


def test_run_anomaly_healthy_finds_grey_matter_like_lesions(tmp_path, capsys):
    """Two healthy phantom subjects as the cohort (a data set folder); a subject with grey-matter-like
    lesions in white matter (not brighter on FLAIR than grey matter) is found: the map ranks its
    lesion voxels above the rest of the brain and the mask overlaps them. 24-slice slabs around the
    most lesioned slice keep it quick; they also check that the slices the healthy slabs do not reach
    after registration are not scored (they were the mask's 4000 false alarms before)."""
    case = P.make_subject(7, lesions=3, lesion_kind="iso")
    centre = int(np.argmax((case.labels.array >= 4).sum(axis=(1, 2))))
    z = slice(centre - 12, centre + 12)
    healthy = tmp_path / "healthy"
    (healthy / "imagesTr").mkdir(parents=True)
    (healthy / "dataset.json").write_text(json.dumps({
        "channel_names": {str(i): ch for i, ch in enumerate(CHANNELS)}, "labels": {"background": 0},
        "numTraining": 2, "file_ending": ".nii.gz"}))
    for seed in (101, 102):
        subject = P.make_subject(seed, lesions=0)
        for i, ch in enumerate(CHANNELS):
            write_volume(slab(subject.images[ch], z), healthy / "imagesTr" / f"h{seed}_{i:04d}.nii.gz")
    inputs = [str(write_volume(slab(case.images[ch], z), tmp_path / f"case_{ch}.nii.gz")) for ch in CHANNELS]
    out = tmp_path / "map.nii.gz"
    capsys.readouterr()
    assert cli_main(["run", "anomaly", "--model", SEGMENTER, "--healthy", str(healthy), "--output", str(out),
                     "--progress", "none", *[a for i in inputs for a in ("--input", i)]]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["healthy_subjects"] == 2 and info["mask_voxels"] > 0
    amap, mask = read_volume(out).array, read_volume(info["outputs"]["mask"]).array > 0
    lesion = case.labels.array[z] >= 4
    from sklearn.metrics import roc_auc_score
    scored = (amap > 0) | lesion
    assert roc_auc_score(lesion[scored], amap[scored]) > 0.95
    assert 2 * (mask & lesion).sum() / (mask.sum() + lesion.sum()) > 0.5
    assert read_volume(out).geometry.same_as(slab(case.images["T1"], z).geometry)


def test_atlas_refuses_bad_input_with_one_line(tmp_path, capsys):
    """A non-segment model, the wrong number of inputs, a cohort without the segmenter's channels:
    one line each, before any segmentation, and no output file."""
    case = P.make_subject(7, lesions=0)
    t1 = str(write_volume(case.images["T1"], tmp_path / "t1.nii.gz"))
    out = tmp_path / "map.nii.gz"
    cohort = tmp_path / "cohort"
    (cohort / "imagesTr").mkdir(parents=True)
    write_volume(case.images["T1"], cohort / "imagesTr" / "h_0000.nii.gz")
    (cohort / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1"}, "labels": {"background": 0},
                                                     "numTraining": 1, "file_ending": ".nii.gz"}))
    for model, inputs, words in [("brain-mri-denoise", [t1], "segment model"),
                                 (SEGMENTER, [t1], "give 4 --input"),
                                 (SEGMENTER, [t1] * 4, "lacks channel(s) T2, PD, FLAIR")]:
        code = cli_main(["run", "anomaly", "--model", model, "--healthy", str(cohort), "--output", str(out),
                         "--progress", "none", *[a for i in inputs for a in ("--input", i)]])
        err = capsys.readouterr().err.strip()
        assert code == 2 and words in err and len(err.splitlines()) == 1, err
        assert not out.exists()
    with pytest.raises(DiffusionMICError, match="at least one healthy subject"):
        TissueAtlas(SEGMENTER, [])
