"""The anomaly-detection study: a quick study writes every method's row (voxel and volume level),
table and figure; each baseline family is a real model that learns; bad input fails with one line
and writes nothing.

The study's floor, the FLAIR intensity itself, is perfect on the phantom (voxel AUROC 1.00, best
Dice 0.97 on the tiny problem below): no reconstruction model beats it there, so the learning tests
compare each trained network with the same network untrained, on a subject it never saw."""
import json

import numpy as np
import pytest
import torch
from study_helpers import slab_dataset, study_context

from DiffusionMICLib.cli import main as cli_main
from DiffusionMICLib.errors import DiffusionMICError
from DiffusionMICLib.study import anomaly as an
from DiffusionMICLib.study import run_study
from DiffusionMICLib.study.learners import load_baseline

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ["diffusion-simplex", "diffusion-gaussian", "diffusion-joint", "diffusion-masked", "diffusion-bundled", "ae",
           "vae", "resnet", "diffusion-gaussian-normative", "diffusion-joint-normative", "flair", "flair-negated",
           "flair-zscore", "flair-normative", "joint-normative", "diffusion-tissue-atlas", "joint-normative-registered"]
TABLES = ["phantom, hyper lesions", "phantom, iso lesions", "phantom, hypo lesions", "phantom, tumour"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    run_study("anomaly", out=out, quick=True)
    return out


def test_quick_study_writes_every_method(quick):
    """The quick study (its fixture) took 145 s here on a quiet 2-core machine, one torch thread."""
    doc = json.loads((quick / "anomaly.json").read_text(encoding="utf-8"))
    assert list(doc["methods"]) == METHODS and doc["quick"] is True
    assert doc["data"]["test-healthy"]["lesions"] == 0 and doc["data"]["validation"]["lesions"] == 3
    assert doc["data"]["test-tumour"]["lesion_kind"] == "tumour"
    for name, r in doc["methods"].items():
        assert list(r["tables"]) == TABLES, name
        # one subject per kind and one healthy subject, each detected once
        assert sorted(r["scores"]) == ["test-healthy/phantom_000", "test-hypo/phantom_000", "test-iso/phantom_000",
                                       "test-tumour/phantom_000", "test/phantom_000"], name
        for table, row in r["tables"].items():
            assert row["volume_auroc"] in (0.0, 0.5, 1.0) and row["top1_error"] in (0.0, 0.5, 1.0), name
            if name == "resnet":
                assert row["voxel_auroc"] is None and row["val_dice"] is None
            else:
                assert 0.0 <= row["voxel_auroc"] <= 1.0 and 0.0 <= row["val_dice"] <= 1.0, (name, table)
        if name != "resnet":
            assert set(np.load(quick / "anomaly" / name / "previews.npz")) == {"anomaly map", "errors", "healthy map"}
    floors = {m: doc["methods"][m]["tables"] for m in ("flair", "flair-negated", "flair-zscore")}
    assert floors["flair"]["phantom, hyper lesions"]["voxel_auroc"] > 0.95     # the floor is strong here
    assert floors["flair"]["phantom, hypo lesions"]["voxel_auroc"] < 0.8       # and blind to dark lesions,
    assert floors["flair-negated"]["phantom, hypo lesions"]["voxel_auroc"] > \
        floors["flair"]["phantom, hypo lesions"]["voxel_auroc"]               # which negation sees better
    assert doc["methods"]["flair"]["training"] is None
    # the normative rows reuse their diffusion rows' models, trained once
    assert doc["methods"]["diffusion-gaussian-normative"]["training"] == doc["methods"]["diffusion-gaussian"]["training"]
    assert not (quick / "anomaly" / "diffusion-gaussian-normative" / "model").exists()
    assert doc["data"]["normative-healthy"] == {"seed": an.NORMATIVE_SEED, "subjects": 2, "lesions": 0,
                                                "lesion_kind": "hyper"}
    text = (quick / "anomaly.md").read_text(encoding="utf-8")
    assert "Top-1 error (volume)" in text and "Top-5" in text and "AUROC (voxel)" in text
    assert (quick / "anomaly.png").stat().st_size > 10_000


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, phantom_dir):
    """Training: subject 0 of the session phantom cut to 8 slices; test: subject 1, the same way."""
    root = tmp_path_factory.mktemp("tiny-anomaly")
    return slab_dataset(phantom_dir, root / "train", 0), slab_dataset(phantom_dir, root / "test", 1)


def _healthy_error(ctx, folder) -> float:
    """Mean squared reconstruction error of the test subject's healthy FLAIR inside its brain."""
    net, _ = load_baseline(folder, ctx.device)
    card = an._card(ctx)
    flair = ctx.data.test[0].read("FLAIR", "healthyTr")
    x, _ = an._lesion_space(card, flair, None)
    (recon,) = an.network_reconstruction(net, card.patch, ctx.device)(x, tuple(slice(0, s) for s in x.shape[1:]))
    brain = an.brain_mask(x + 1.0)
    return float(np.mean((recon[0] - x[0])[brain] ** 2))


@pytest.mark.parametrize("name", ["ae", pytest.param("vae", marks=pytest.mark.slow)])   # the VAE family: test_study_generate
def test_reconstruction_model_learns_healthy_anatomy(name, tiny, tmp_path):
    """Trained on one subject's healthy slab: reconstructs another subject's healthy slab far better
    than untrained, and its map ranks that subject's lesion voxels high."""
    train, test = tiny
    method = {m.name: m for m in an.methods(True)}[name]
    errors, rows = {}, {}
    for steps in (0, 150):
        ctx = study_context("anomaly", tmp_path / str(steps), train, test, steps=steps, kind="dataset")
        method.fit(ctx, tmp_path / f"{name}-{steps}")
        errors[steps] = _healthy_error(ctx, tmp_path / f"{name}-{steps}")
        rows[steps] = method.evaluate(ctx, tmp_path / f"{name}-{steps}").tables["phantom"]
    assert errors[150] < 0.5 * errors[0], errors
    assert rows[150]["voxel_auroc"] > 0.9, rows


def test_resnet_learns_to_find_lesion_slices(phantom_dir, heldout_dir, tmp_path):
    """Trained on three subjects' lesion crops: tells the held-out subject's lesion slices from the
    others better than chance and than untrained."""
    from monai.metrics import compute_roc_auc
    method = {m.name: m for m in an.methods(True)}["resnet"]
    auroc = {}
    for steps in (0, 300):
        ctx = study_context("anomaly", tmp_path / str(steps), phantom_dir, heldout_dir, steps=steps, kind="dataset")
        method.fit(ctx, tmp_path / f"resnet-{steps}")
        net, _ = load_baseline(tmp_path / f"resnet-{steps}", ctx.device)
        case = ctx.data.test[0]
        card = an._card(ctx)
        x, lesion = an._lesion_space(card, case.read("FLAIR"), case.read_label().array == 4)
        has = lesion.any(axis=(1, 2))[an.brain_mask(x + 1.0).any(axis=(1, 2))]
        p = an.slice_probabilities(net, card, case.read("FLAIR"), ctx.device)
        auroc[steps] = float(compute_roc_auc(torch.from_numpy(p), torch.from_numpy(has.astype(np.int64))))
    assert auroc[300] > 0.75 and auroc[300] > auroc[0] + 0.1, auroc     # measured: 0.85 against 0.53


def test_normative_maps_are_voxelwise_z_scores(tmp_path, phantom_dir):
    """Constructed: a cohort whose map is 1 +- 0.1 everywhere (sd 0.1155 with 4 subjects); a case
    whose map is 3 sd above normal at one voxel and 3 sd below at another. Residual maps (one-sided)
    see only the first; intensities (two-sided) both; zero stays zero; the score is the top mean."""
    from DiffusionMICLib.volume import Geometry, Volume
    grid = Geometry((4, 4, 2), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    cohort = [Volume(np.full((2, 4, 4), v, np.float32), grid) for v in (0.9, 1.1, 0.9, 1.1)]
    mean, sd = an.voxel_statistics(cohort)
    assert np.allclose(mean.array, 1.0) and np.allclose(sd.array, np.std([0.9, 1.1, 0.9, 1.1], ddof=1), atol=1e-6)
    case = np.ones((2, 4, 4), np.float32)
    case[0, 1, 1], case[1, 2, 2], case[1, 0, 0] = 1 + 3 * sd.array[0, 0, 0], 1 - 3 * sd.array[0, 0, 0], 0.0
    ctx = study_context("anomaly", tmp_path, phantom_dir, phantom_dir, steps=0)
    ctx.cache["normative"] = [{"which": m} for m in cohort]
    detector = lambda channels: (channels["which"], 0.0)       # noqa: E731 (a map per "case")
    one, score = an.normative(ctx, [detector], two_sided=False)({"which": Volume(case, grid)})
    assert one.array[0, 1, 1] == pytest.approx(3.0, abs=1e-4) and one.array[1, 2, 2] == 0.0 and one.array[1, 0, 0] == 0
    assert score == pytest.approx(3.0, abs=1e-4)                 # top 0.1 % of 31 voxels: the largest
    two, _ = an.normative(ctx, [detector], two_sided=True)({"which": Volume(case, grid)})
    assert two.array[1, 2, 2] == pytest.approx(3.0, abs=1e-4) and two.array[0, 0, 0] == pytest.approx(0.0, abs=1e-4)


def test_validation_threshold_and_volume_cut():
    from DiffusionMICLib.volume import Geometry, Volume
    grid = Geometry((2, 2, 1), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    maps = [Volume(np.array([[[0.1, 0.5], [0.9, 0.2]]], np.float32), grid), Volume(np.ones((1, 2, 2), np.float32), grid)]
    mask = Volume(np.array([[[1, 1], [1, 0]]], np.uint8), grid)
    items = [{"anomalous": False, "mask": mask}, {"anomalous": True, "mask": mask}]
    assert an.healthy_above(maps, items, 0.5) == pytest.approx(100 * 2 / 3)       # 0.5 and 0.9 of 3 scored voxels
    assert an.healthy_above(maps, items, None) is None and an.healthy_above(maps, items[1:] * 2, 0.5) is None
    assert an.best_cut([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == pytest.approx(0.5)
    # the false-alarm threshold: a third of the healthy case's 3 scored voxels (0.1, 0.5, 0.9) above it;
    # the lesioned case's map (all 1) does not move it
    t = an.false_alarm_threshold(maps, items, 1 / 3)
    assert 0.5 < t < 0.9 and an.healthy_above(maps, items, t) == pytest.approx(100 / 3)
    assert an.false_alarm_threshold(maps, items, 0.5) == pytest.approx(0.5)
    assert an.false_alarm_threshold(maps, items[1:] * 2, 0.1) is None
    assert an.volume_auroc([0.1, 0.9], [False, True]) == 1.0 and an.volume_auroc([0.1, 0.9], [True, True]) is None


def test_largest_region_counts_one_connected_region_in_ml():
    """Eleven scattered voxels above the threshold lose to one region of four; 2 mm voxels are 0.008 mL."""
    from DiffusionMICLib.volume import Geometry, Volume
    grid = Geometry((8, 8, 4), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    a = np.zeros((4, 8, 8), np.float32)
    a[0, ::3, ::3] = 5.0                        # 9 isolated voxels
    a[2, 4, 1:5] = 3.0                          # one region of 4
    a[3, 1, 1], a[2, 1, 2] = 3.0, 3.0           # two more isolated voxels
    m = Volume(a, grid)
    assert an.largest_region(m, 2.0) == pytest.approx(4 * 0.008)
    assert an.largest_region(m, 4.0) == pytest.approx(0.008) and an.largest_region(m, 6.0) == 0.0


def test_bad_input_one_line_and_nothing_written(tmp_path, phantom_dir, capsys):
    out = tmp_path / "out"
    with pytest.raises(DiffusionMICError, match="unknown anomaly method.*flair"):
        run_study("anomaly", out=out, quick=True, methods=["patchcore"])
    no_flair = tmp_path / "no-flair"
    (no_flair / "imagesTr").mkdir(parents=True)
    meta = json.loads((phantom_dir / "dataset.json").read_text(encoding="utf-8"))
    (no_flair / "dataset.json").write_text(json.dumps({**meta, "channel_names": {"0": "T1"}}), encoding="utf-8")
    for case in ("phantom_000", "phantom_001"):
        (no_flair / "imagesTr" / f"{case}_0000.nii.gz").write_bytes(
            (phantom_dir / "imagesTr" / f"{case}_0000.nii.gz").read_bytes())
    assert cli_main(["study", "anomaly", "--quick", "--data", str(no_flair), "--out", str(out)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("diffusion-mic: error:") and "FLAIR" in err[0]
    assert not out.exists()
