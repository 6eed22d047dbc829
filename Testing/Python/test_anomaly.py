"""Anomaly detection (AnoDDPM): healthy-data training, simplex partial diffusion, maps, metrics, CLI."""
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.spatial.transform import Rotation

import DiffusionMICLib as dmic
from DiffusionMICLib.cli import main as cli_main
from DiffusionMICLib.datasets import read_dataset
from DiffusionMICLib.engine.network import build_network
from DiffusionMICLib.engine.pipeline import train
from DiffusionMICLib.errors import DiffusionMICError
from DiffusionMICLib.metrics import average_precision, best_dice, detection_metrics
from DiffusionMICLib.models import load_model
from DiffusionMICLib.progress import Progress
from DiffusionMICLib.tasks import RunOptions, get_task
from DiffusionMICLib.volume import Geometry, Volume, orient, read_volume, write_volume

STEPS = 100      # ~0.97-0.99 voxel AUROC on the held-out slab after 80-150 steps; untrained ~0.4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory, phantom_dir):
    """A tiny FLAIR model of healthy anatomy (healthyTr), simplex noise, calibrated on one case."""
    from conftest import TINY_NETWORK
    out = tmp_path_factory.mktemp("models") / "anomaly"
    train("anomaly", phantom_dir, out, max_steps=STEPS,
          settings={"network": TINY_NETWORK, "patch": [48, 48], "defaults": {"calibration_cases": 1},
                    "train": {"batch_size": 8, "ema_start": 20, "checkpoint_every": 1000}})
    return out


def slab(vol: Volume, z0: int, z1: int) -> Volume:
    """Axial slices z0:z1 with their true geometry."""
    return Volume.from_sitk(vol.to_sitk()[:, :, z0:z1])


@pytest.fixture(scope="module")
def heldout(heldout_dir):
    """(FLAIR, label map) of 16 slices of the held-out subject around its largest lesion (fast runs)."""
    label = read_volume(heldout_dir / "labelsTr" / "phantom_000.nii.gz")
    per_slice = (label.array == 4).sum(axis=(1, 2))
    assert per_slice.sum() > 0
    zc = int(np.argmax(per_slice))
    z0 = int(np.clip(zc - 8, 0, label.array.shape[0] - 16))
    flair = read_volume(heldout_dir / "imagesTr" / "phantom_000_0003.nii.gz")
    return slab(flair, z0, z0 + 16), slab(label, z0, z0 + 16)


def test_card_training_data_and_calibration(model):
    card, _ = load_model(model)
    assert card.task == "anomaly" and card.inputs == ["FLAIR"] and card.outputs == ["anomaly"]
    assert card.defaults["noise"]["type"] == "simplex" and 0 < card.defaults["strength"] < 1
    assert card.defaults["threshold"] > 0 and card.defaults["score_threshold"] > 0
    assert card.defaults["calibration"]["cases"] == ["phantom_000"]
    assert card.training["steps"] == STEPS


def test_needs_healthy_data(phantom_dir, tmp_path):
    data = tmp_path / "lesions-only"
    shutil.copytree(phantom_dir, data, ignore=shutil.ignore_patterns("healthyTr"))
    dataset = read_dataset(data)
    task = get_task("anomaly")
    card = task.make_card(dataset, {})
    with pytest.raises(DiffusionMICError, match="healthy"):
        task.training_cases(card, dataset, dataset.cases)
    with pytest.raises(DiffusionMICError, match="not in the data set"):
        task.make_card(dataset, {"task": {"channels": ["CT"]}})


def test_detects_lesions_on_heldout_subject(model, heldout):
    """Learning: the trained model's map ranks lesion voxels far above healthy ones; untrained does not."""
    flair, label = heldout
    task = get_task("anomaly")
    result = dmic.anomaly(flair, model, seed=0)
    trained = task.evaluate(result.outputs["output"], label, None)
    card, _ = load_model(model)
    untrained_net = build_network(card.network).eval()
    from conftest import perturb
    perturb(untrained_net)
    with torch.inference_mode():
        base = task.run(card, untrained_net, [flair], RunOptions().with_card_defaults(card), Progress(),
                        torch.device("cpu"))
    untrained = task.evaluate(base.outputs["output"], label, None)
    assert trained["voxel_auroc"] >= 0.8, trained
    assert trained["voxel_auroc"] > untrained["voxel_auroc"] + 0.2, (trained, untrained)
    assert trained["voxel_auprc"] > 5 * trained["lesion_prevalence"]
    assert trained["best_dice"] > untrained["best_dice"]


def test_outputs_on_exact_grid_of_oblique_reoriented_input(model, heldout):
    flair, _ = heldout
    rot = Rotation.from_euler("xyz", [12, -7, 20], degrees=True).as_matrix()
    oblique = Volume(flair.array, Geometry(flair.size, (2.0, 2.2, 2.5), (-20.0, 31.5, 7.0), tuple(rot.ravel())))
    flipped = Volume.from_sitk(sitk.DICOMOrient(oblique.to_sitk(), "PIL"))   # same image, other axis order
    a = dmic.anomaly(oblique, model, seed=3)
    b = dmic.anomaly(flipped, model, seed=3)
    for res, src in ((a, oblique), (b, flipped)):
        assert set(res.outputs) == {"output", "mask"}
        assert res.outputs["output"].geometry.same_as(src.geometry, tol=1e-9)
        assert res.outputs["mask"].geometry.same_as(src.geometry, tol=1e-9)
        assert res.outputs["output"].array.dtype == np.float32 and res.outputs["mask"].array.dtype == np.uint8
        assert (res.outputs["output"].array >= 0).all() and np.isfinite(res.outputs["output"].array).all()
        np.testing.assert_array_equal(res.outputs["mask"].array, res.outputs["output"].array > res.info["threshold"])
    # a reorientation is a pure axis permutation: the same map, voxel for voxel
    np.testing.assert_allclose(orient(a.outputs["output"], "RAS").array, orient(b.outputs["output"], "RAS").array,
                               atol=1e-5)
    assert a.info["score"] == pytest.approx(b.info["score"], rel=1e-4)


def test_seed_determinism_ensemble_and_score(model, heldout):
    flair, _ = heldout
    a = dmic.anomaly(flair, model, seed=1)
    c = dmic.anomaly(flair, model, seed=2)
    both = dmic.anomaly(flair, model, seed=1, ensemble=2)
    assert not np.array_equal(a.outputs["output"].array, c.outputs["output"].array)
    # the ensemble averages the draws of seeds 1 and 2, drawn again: same seed, same draw
    np.testing.assert_allclose(both.outputs["output"].array,
                               (a.outputs["output"].array + c.outputs["output"].array) / 2, atol=1e-5)
    info = a.info
    assert info["score"] > 0 and info["noise"] == "simplex" and isinstance(info["anomalous"], bool)
    assert {"threshold", "mask_voxels", "seed", "sampler", "steps"} <= set(info)
    with pytest.raises(DiffusionMICError, match="1 input volume"):
        dmic.anomaly([flair, flair], model)


def test_cli_run_evaluate_and_bad_input(model, heldout, tmp_path, capsys):
    flair, label = heldout
    src = write_volume(flair, tmp_path / "flair.nrrd")
    ref = write_volume(label, tmp_path / "label.nrrd")
    out, mask = tmp_path / "map.nrrd", tmp_path / "sub" / "lesions.nrrd"
    assert cli_main(["run", "anomaly", "--model", str(model), "--input", str(src), "--output", str(out),
                     "--mask", str(mask), "--progress", "none", "--steps", "5"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["outputs"] == {"output": str(out), "mask": str(mask)} and printed["score"] > 0
    assert read_volume(mask).array.dtype == np.uint8
    assert cli_main(["evaluate", "anomaly", "--pred", str(out), "--ref", str(ref)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert {"voxel_auroc", "voxel_auprc", "best_dice", "lesion_voxels"} <= set(metrics)
    assert 0 <= metrics["voxel_auroc"] <= 1
    # failures: one line on stderr, exit 2, nothing written
    bad = tmp_path / "bad.nrrd"
    for args in (["--input", str(tmp_path / "missing.nrrd")], ["--input", str(src), "--input", str(src)]):
        assert cli_main(["run", "anomaly", "--model", str(model), *args, "--output", str(bad),
                         "--progress", "none"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("diffusion-mic: error:") and "\n" not in err
        assert not bad.exists() and not (tmp_path / "bad-mask.nrrd").exists()


def test_detection_metrics_against_known_answers():
    rng = np.random.default_rng(0)
    y = rng.random(5000) < 0.05
    s = rng.random(5000) + y * 0.6
    try:
        from sklearn.metrics import average_precision_score
        assert average_precision(s, y) == pytest.approx(average_precision_score(y, s), abs=1e-9)
    except ImportError:
        pass
    assert average_precision(y.astype(float), y) == pytest.approx(1.0)
    assert best_dice(y.astype(float), y) == (pytest.approx(1.0), pytest.approx(1.0))
    assert best_dice(np.r_[3.0, 2, 1, 0], np.r_[1, 1, 0, 0]) == (pytest.approx(1.0), pytest.approx(2.0))

    g = Geometry((6, 5, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    maps, refs = [], []
    for i in range(4):      # two volumes with a lesion (and a higher map there), two without
        lesion = np.zeros((4, 5, 6), np.uint8)
        if i < 2:
            lesion[1:3, 1:3, 1:3] = 1
        m = rng.random((4, 5, 6)).astype(np.float32) * 0.5 + lesion
        maps.append(Volume(m, g))
        refs.append(Volume(lesion, g))
    out = detection_metrics(maps, refs)
    assert out["voxel_auroc"] == pytest.approx(1.0) and out["voxel_auprc"] == pytest.approx(1.0)
    assert out["volume_auroc"] == pytest.approx(1.0) and out["volume_error"] == 0.0
    assert out["volumes"] == 4 and len(out["scores"]) == 4
    given = detection_metrics(maps, refs, scores=[1, 1, 0, 0], score_threshold=2.0)
    assert given["volume_error"] == pytest.approx(0.5) and given["volume_threshold_chosen"] == "given"
    with pytest.raises(DiffusionMICError, match="as many"):
        detection_metrics(maps, refs[:2])


def test_reference_lesions_of_every_phantom_kind():
    from DiffusionMICLib.tasks.anomaly import lesion_reference
    geometry = Geometry((1, 1, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    tumour = Volume(np.array([[[0, 3, 7, 9]]], np.uint8).reshape(4, 1, 1), geometry)
    assert lesion_reference(tumour).ravel().tolist() == [False, False, True, True]
    assert lesion_reference(tumour.with_array(np.array([0, 1, 0, 1], np.uint8).reshape(4, 1, 1))).sum() == 2
    with pytest.raises(DiffusionMICError, match="labels"):
        lesion_reference(tumour.with_array(np.array([0, 3, 12, 4], np.uint8).reshape(4, 1, 1)))


class EchoContext(torch.nn.Module):
    """A stand-in x0 predictor that returns the blanked context channels it is given (0 in the boxes)."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def forward(self, x, t, class_labels=None):
        return x[:, self.n:2 * self.n]


def test_masked_model_redraws_every_voxel_from_its_surroundings_once(phantom_dir):
    """pDDPM-style masking: the card and conditioning; the four passes blank complementary boxes, so
    an x0 predictor that returns its blanked context gives 0 at every voxel of the crop."""
    from DiffusionMICLib.engine.trainer import Batch
    from DiffusionMICLib.tasks.anomaly import checker
    task = get_task("anomaly")
    dataset = read_dataset(phantom_dir)
    card = task.make_card(dataset, {"task": {"masked": {"box": 8}}, "schedule": {"prediction_type": "sample",
                                                                                 "train_steps": 10}})
    assert card.network["in_channels"] == 3 and card.defaults["masked"] == {"box": 8}
    cover = sum(checker((40, 44), 8, o).astype(int) for o in ((0, 0), (8, 0), (0, 8), (8, 8)))
    assert (cover == 1).all()
    target = torch.rand(4, 1, 64, 64) * 2 - 1
    batch = task.augment(card)(Batch(target), torch.Generator().manual_seed(0))
    boxes = batch.cond[:, 1] > 0
    assert batch.cond.shape == (4, 2, 64, 64) and 0.2 < boxes.float().mean() < 0.3
    assert (batch.cond[:, 0][boxes] == 0).all() and torch.equal(batch.cond[:, 0][~boxes], target[:, 0][~boxes])
    options = RunOptions(steps=4, strength=1.0, seed=0).with_card_defaults(card)
    recon = task.diffusion_reconstruction(card, EchoContext(1), options, Progress(), torch.device("cpu"))
    x = np.random.default_rng(0).uniform(0.1, 1.0, (1, 4, 40, 44)).astype(np.float32)
    crop = (slice(0, 4), slice(2, 38), slice(3, 40))
    out = next(iter(recon(x, crop)))
    np.testing.assert_allclose(out[(slice(None), *crop)], 0.0, atol=1e-5)
    outside = np.ones(x.shape, bool)
    outside[(slice(None), *crop)] = False
    np.testing.assert_array_equal(out[outside], x[outside])
    with pytest.raises(DiffusionMICError, match="masked"):
        task.make_card(dataset, {"task": {"masked": {"box": 1}}})
