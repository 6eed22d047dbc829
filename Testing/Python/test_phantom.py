"""The brain phantom: layout, physics, determinism, variability, noise (2 mm, a few subjects)."""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import socket
import time

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from DiffusionMICLib import phantom as P
from DiffusionMICLib.errors import DiffusionMICError

SEED, SUBJECTS = 7, 2
VARIANTS = ("imagesTr", "cleanTr", "healthyTr")


def _digests(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _array(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    t = time.perf_counter()
    ids = P.write_phantom(out, subjects=SUBJECTS, seed=SEED, resolution=2.0, noise=3.0, lesions=3)
    print(f"\nwrite_phantom: {SUBJECTS} subjects at 2 mm in {time.perf_counter() - t:.1f} s "
          f"(includes loading the MNI maps)")
    return out, ids


@pytest.fixture(scope="module")
def subject():
    t = time.perf_counter()
    s = P.make_subject(11, resolution=2.0, noise=3.0, lesions=3)
    print(f"\nmake_subject at 2 mm: {time.perf_counter() - t:.2f} s, grid {s.labels.geometry.size}")
    return s


def test_layout_and_dataset_json(dataset):
    out, ids = dataset
    assert ids == ["phantom_000", "phantom_001"]
    expected = {"dataset.json"}
    for case in ids:
        expected.add(f"labelsTr/{case}.nii.gz")
        expected |= {f"{v}/{case}_{c:04d}.nii.gz" for v in VARIANTS for c in range(4)}
    assert set(_digests(out)) == expected

    meta = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert meta["channel_names"] == {"0": "T1", "1": "T2", "2": "PD", "3": "FLAIR"}
    assert meta["labels"] == {"background": 0, "CSF": 1, "GM": 2, "WM": 3, "lesion": 4}
    assert meta["numTraining"] == 2 and meta["file_ending"] == ".nii.gz"
    assert {k: meta["phantom"][k] for k in ("seed", "resolution", "noise", "lesions")} == \
        {"seed": SEED, "resolution": 2.0, "noise": 3.0, "lesions": 3}

    grid = P.grid(2.0)
    for name in expected - {"dataset.json"}:
        image = sitk.ReadImage(str(out / name))
        assert image.GetDimension() == 3
        assert image.GetSize() == grid.size
        assert np.allclose(image.GetSpacing(), grid.spacing)
        assert np.allclose(image.GetOrigin(), grid.origin, atol=1e-4)
        assert np.allclose(image.GetDirection(), grid.direction)
        if name.startswith("labelsTr"):
            assert image.GetPixelID() == sitk.sitkUInt8
            assert set(np.unique(sitk.GetArrayViewFromImage(image))) <= {0, 1, 2, 3, 4}
        else:
            assert image.GetPixelID() == sitk.sitkFloat32
    size = grid.size
    assert all(70 <= n <= 110 for n in size), size


def test_tissue_contrast_in_clean_images(dataset):
    out, ids = dataset
    for case in ids:
        lab = _array(out / "labelsTr" / f"{case}.nii.gz")
        assert (lab == 4).any(), "three lesions should label some voxels"
        img = {ch: _array(out / "cleanTr" / f"{case}_{c:04d}.nii.gz") for c, ch in enumerate(P.CHANNELS)}
        mean = {ch: {k: float(a[lab == k].mean()) for k in range(5)} for ch, a in img.items()}
        print(f"\n{case} clean means (bg, CSF, GM, WM, lesion):",
              {ch: [round(v) for v in m.values()] for ch, m in mean.items()})
        t1, t2, fl = mean["T1"], mean["T2"], mean["FLAIR"]
        assert t1[3] > t1[2] > t1[1]                      # T1w: WM > GM > CSF
        assert t2[1] > t2[2] > t2[3]                      # T2w: CSF > GM > WM
        assert t1[4] < t1[3] and t2[4] > t2[3]            # lesion T1-hypo, T2-hyper
        assert fl[4] > 1.2 * fl[3]                        # FLAIR lesion brighter than WM
        # CSF nulled: interior CSF (label eroded by a 3x3x3 cube, free of partial volume with GM)
        interior = ndimage.binary_erosion(lab == 1, structure=np.ones((3, 3, 3)))
        assert interior.sum() > 50
        assert img["FLAIR"][interior].mean() < 0.15 * fl[3]
        assert fl[1] < fl[3] and fl[1] < fl[2]
        for ch in P.CHANNELS:                             # O(100-1000) in the brain, 0 outside
            assert 50 < max(mean[ch][k] for k in (1, 2, 3)) < 1000
            assert mean[ch][0] < 5 and img[ch].min() >= 0


def test_same_seed_same_subject_other_seed_other_subject():
    a, b, c = (P.make_subject(s, resolution=2.0, noise=2.0, lesions=2) for s in (3, 3, 4))
    for x, y in ((a, b), (a, c)):
        assert x.labels.geometry == y.labels.geometry
    assert np.array_equal(a.labels.array, b.labels.array)
    for ch in P.CHANNELS:
        for variant in ("images", "clean", "healthy"):
            assert np.array_equal(getattr(a, variant)[ch].array, getattr(b, variant)[ch].array)
            assert getattr(a, variant)[ch].geometry == a.labels.geometry
            assert not np.array_equal(getattr(a, variant)[ch].array, getattr(c, variant)[ch].array)


def test_subjects_differ_in_anatomy(dataset):
    out, ids = dataset
    a, b = (_array(out / "labelsTr" / f"{case}.nii.gz") for case in ids)
    brain = (a > 0) | (b > 0)
    differ = float((a != b)[brain].mean())
    print(f"\nlabel disagreement between two subjects: {differ:.1%} of brain voxels")
    assert differ > 0.15
    size_a, size_b = (a > 0).sum(), (b > 0).sum()
    assert size_a != size_b


def test_rewrite_is_byte_identical_and_removes_stale_cases(dataset, tmp_path):
    out, _ = dataset
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "imagesTr" / "notes.txt").write_text("not a phantom file", encoding="utf-8")
    calls = []
    ids = P.write_phantom(copy, subjects=1, seed=SEED, progress=lambda d, n: calls.append((d, n)))
    assert ids == ["phantom_000"] and calls == [(1, 1)]
    old, new = _digests(out), _digests(copy)
    case0 = {k for k in old if "phantom_000" in k}
    assert case0 and all(new[k] == old[k] for k in case0)      # same seed, same bytes
    assert not any("phantom_001" in k for k in new)             # stale case removed
    assert "imagesTr/notes.txt" in new
    assert json.loads((copy / "dataset.json").read_text(encoding="utf-8"))["numTraining"] == 1


def test_healthy_subject_without_noise():
    s = P.make_subject(5, resolution=2.0, noise=0.0, lesions=0)
    assert not (s.labels.array == 4).any()
    assert set(np.unique(s.labels.array)) == {0, 1, 2, 3}
    for ch in P.CHANNELS:
        assert np.array_equal(s.healthy[ch].array, s.clean[ch].array)
        assert np.array_equal(s.images[ch].array, s.clean[ch].array)
        assert s.images[ch].array.dtype == np.float32


def test_lesions_change_only_a_small_region(subject):
    lab = subject.labels.array
    lesion = lab == 4
    assert lesion.any()
    changed = np.abs(subject.clean["T2"].array - subject.healthy["T2"].array) > 1e-3
    assert changed[lesion].all()
    assert changed.sum() < 0.05 * (lab > 0).sum()
    assert (subject.clean["FLAIR"].array[lesion] > subject.healthy["FLAIR"].array[lesion]).mean() > 0.9


def test_rician_noise_level(subject):
    lab = subject.labels.array
    wm = ndimage.binary_erosion(lab == 3, iterations=2)
    head = ndimage.binary_dilation(lab > 0, iterations=3)
    for ch in P.CHANNELS:
        pure = [P._signal(ch, v["T1"], v["T2"], v["PD"]) for v in P.TISSUES.values()]
        sigma = 0.03 * P.SCALE * max(pure)          # nominal: subject jitter moves it a few %
        img, clean = subject.images[ch].array, subject.clean[ch].array
        residual = (img - clean)[wm].std()
        floor = img[~head].mean()                   # Rician floor: sigma * sqrt(pi / 2)
        print(f"\n{ch}: sigma {sigma:.1f}, WM residual std {residual:.1f}, "
              f"background mean {floor:.1f} (expected {sigma * math.sqrt(math.pi / 2):.1f})")
        assert 0.8 * sigma < residual < 1.25 * sigma
        assert 0.8 < floor / (sigma * math.sqrt(math.pi / 2)) < 1.2
        assert clean[~head].max() < 0.1 * sigma      # outside the head: nothing but noise


def test_templates_load_without_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    P._mni.cache_clear()
    P._prefiltered.cache_clear()
    template = P._mni()
    assert template.fractions.shape[0] == 3
    assert 0.0 <= template.fractions.min() and template.fractions.max() <= 1.0


@pytest.mark.parametrize("kwargs", [dict(seed=-1), dict(seed=0, resolution=0), dict(seed=0, noise=-1),
                                    dict(seed=0, lesions=-2), dict(seed=0, lesions=1.5),
                                    dict(seed=0, lesion_kind="bright")])
def test_bad_arguments(kwargs):
    with pytest.raises(DiffusionMICError):
        P.make_subject(**kwargs)


def test_bad_arguments_write_nothing(tmp_path):
    with pytest.raises(DiffusionMICError, match="subjects"):
        P.write_phantom(tmp_path / "out", subjects=0)
    with pytest.raises(DiffusionMICError, match="resolution"):
        P.write_phantom(tmp_path / "out", resolution=-2)
    assert not (tmp_path / "out").exists()


# ---- lesion kinds ----------------------------------------------------------------------------------
KIND_SEED = 5          # its tumour has a necrotic core


@pytest.fixture(scope="module")
def kinds():
    return {kind: P.make_subject(KIND_SEED, noise=0.0, lesions=3, lesion_kind=kind) for kind in P.LESION_KINDS}


def _median(subject, ch, mask):
    return float(np.median(subject.clean[ch].array[mask]))


def test_lesion_kinds_share_places_and_label_where_the_contrast_changed(kinds):
    places = {kind: kinds[kind].labels.array >= 4 for kind in ("hyper", "iso", "hypo", "mixed")}
    assert places["hyper"].sum() > 50
    assert all(np.array_equal(places["hyper"], m) for m in places.values())
    for kind, s in kinds.items():
        lab = s.labels.array
        assert set(np.unique(lab[lab >= 4])) <= set(P.labels_for(kind).values()), kind
        changed = np.zeros(lab.shape, bool)
        for ch in P.CHANNELS:
            changed |= np.abs(s.clean[ch].array - s.healthy[ch].array) > 1e-3
        grown = ndimage.binary_dilation(lab >= 4, iterations=2)
        # labelled voxels changed; unlabelled changes are partial-volume edges (or mass effect)
        assert changed[lab >= 4].mean() > 0.99, kind
        if kind != "tumour":
            assert not changed[~grown].any(), kind
    assert set(np.unique(kinds["mixed"].labels.array)) - {0, 1, 2, 3} >= {4, 6}
    assert set(np.unique(kinds["tumour"].labels.array)) == {0, 1, 2, 3, 7, 8, 9}


def test_lesion_kind_contrasts(kinds):
    tissue = {name: kinds["hyper"].labels.array == v for name, v in P.LABELS.items() if 1 <= v <= 3}
    med = {ch: {name: _median(kinds["hyper"], ch, m) for name, m in tissue.items()} for ch in P.CHANNELS}
    hyper = kinds["hyper"].labels.array == 4
    assert _median(kinds["hyper"], "FLAIR", hyper) > 1.5 * max(med["FLAIR"].values())
    iso = kinds["iso"].labels.array == 5
    for ch in P.CHANNELS:               # nearer grey matter than white matter in every contrast
        les = _median(kinds["iso"], ch, iso)
        assert abs(les - med[ch]["GM"]) < abs(les - med[ch]["WM"]) or ch == "FLAIR", ch
        assert abs(les - med[ch]["GM"]) < 0.15 * med[ch]["GM"], ch
    hypo = kinds["hypo"].labels.array == 6
    assert _median(kinds["hypo"], "T1", hypo) < med["T1"]["GM"]
    assert _median(kinds["hypo"], "FLAIR", hypo) < med["FLAIR"]["WM"]
    assert med["T2"]["WM"] < _median(kinds["hypo"], "T2", hypo) < med["T2"]["CSF"]
    t = kinds["tumour"]
    lab = t.labels.array
    assert _median(t, "FLAIR", lab == 8) > 1.2 * med["FLAIR"]["WM"]           # oedema: FLAIR-bright
    assert _median(t, "FLAIR", lab == 9) < med["FLAIR"]["WM"]                 # necrosis: dark on FLAIR,
    assert _median(t, "T2", lab == 9) > 2 * med["T2"]["WM"]                   # bright on T2


def test_tumour_mass_effect_moves_tissue_nearby_only(kinds):
    t = kinds["tumour"]
    h = P.make_subject(KIND_SEED, noise=0.0, lesions=0)
    for ch in P.CHANNELS:               # `healthy` is the undeformed subject
        assert np.array_equal(t.healthy[ch].array, h.clean[ch].array)
    lab, before = t.labels.array, h.labels.array
    distance = ndimage.distance_transform_edt(lab < 7) * 2.0                   # mm from the tumour
    moved = (lab != before) & (lab < 4) & (before > 0)
    near, far = (distance > 0) & (distance <= 10) & (before > 0), distance > 95   # 4 widths at most 92 mm
    assert moved[near].mean() > 0.05
    assert not moved[far].any()
    assert np.array_equal(t.clean["T1"].array[far], h.clean["T1"].array[far])


def test_push_moves_values_outwards_without_folding():
    axes = P._axes_mm(2.0)
    centre = np.array([axes[0][44], axes[1][52], axes[2][48]])
    rel = np.meshgrid(axes[2] - centre[2], axes[1] - centre[1], axes[0] - centre[0], indexing="ij")
    distance = np.sqrt(sum(r**2 for r in rel)).astype(np.float32)
    pushed = P._push(distance[None], centre, 7.0, 18.0, 2.0)[0]
    assert (pushed <= distance + 1e-3).all()                # each value came from nearer the centre
    assert (distance - pushed).max() > 5.0                  # by up to about the amplitude
    ray = pushed[48, 52, 44:]                               # along +x from the centre
    assert (np.diff(ray) >= 0).all()                        # monotone: nothing folds (the core, where
    assert (np.diff(ray[ray > 0]) > 0).all()                # the mass sits, all comes from the centre)
    assert np.array_equal(pushed[:, :, :5], distance[:, :, :5])


def test_lesion_kinds_are_deterministic_and_written_with_their_labels(kinds, tmp_path):
    for kind in ("mixed", "tumour"):
        again = P.make_subject(KIND_SEED, noise=0.0, lesions=3, lesion_kind=kind)
        assert np.array_equal(again.labels.array, kinds[kind].labels.array)
        assert np.array_equal(again.clean["FLAIR"].array, kinds[kind].clean["FLAIR"].array)
    P.write_phantom(tmp_path, subjects=1, seed=3, lesion_kind="tumour")
    meta = json.loads((tmp_path / "dataset.json").read_text(encoding="utf-8"))
    assert meta["labels"] == {"background": 0, "CSF": 1, "GM": 2, "WM": 3, "tumour": 7, "oedema": 8,
                              "necrosis": 9}
    assert meta["phantom"]["lesion_kind"] == "tumour"
    assert P.labels_for("hyper") == P.LABELS


def test_cli_lesion_kinds_are_the_phantoms():
    from DiffusionMICLib.cli import build_parser
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    action = next(a for a in sub.choices["phantom"]._actions if a.dest == "lesion_kind")
    assert tuple(action.choices) == tuple(P.LESION_KINDS)
