"""Diffusion segmentation end to end: card, one-hot targets, label map + uncertainty, metrics, CLI, learning."""
import json
import time

import numpy as np
import pytest

import DiffusionMICLib as dmic
from DiffusionMICLib.cli import main as cli_main
from DiffusionMICLib.datasets import read_dataset
from DiffusionMICLib.engine.batches import random_batches
from DiffusionMICLib.engine.pipeline import train
from DiffusionMICLib.errors import DiffusionMICError
from DiffusionMICLib.metrics import segmentation_metrics
from DiffusionMICLib.tasks import get_task
from DiffusionMICLib.volume import Geometry, Volume, read_volume, write_volume
from test_translate import image, oblique, perturbed_model, small, sub_volume, tiny_settings_for, write_msd

LABELS = {"background": 0, "CSF": 1, "GM": 2, "WM": 3, "lesion": 4}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, phantom_dir):
    return perturbed_model(tmp_path_factory, phantom_dir, "segment", "tiny-segment", {"task": {"inputs": ["T1", "T2"]}})


def test_card_and_one_hot_targets(phantom_dir):
    task, ds = get_task("segment"), read_dataset(phantom_dir)
    card = task.make_card(ds, {})
    assert card.labels == LABELS and card.inputs == ["T1", "T2", "PD", "FLAIR"] and card.outputs == ["labels"]
    assert (card.network["in_channels"], card.network["out_channels"]) == (9, 5)
    card = task.make_card(ds, {"task": {"inputs": ["T1"]}})
    (tc,) = task.training_cases(card, ds, ds.cases[:1])
    labels = read_volume(phantom_dir / "labelsTr" / "phantom_000.nii.gz").array
    assert tc.target.shape == (5, *labels.shape) and tc.cond.shape == (1, *labels.shape)
    assert set(np.unique(tc.target)) == {-1.0, 1.0} and (tc.target.sum(axis=0) == 2 - 5).all()   # one +1 per voxel
    assert np.array_equal(np.argmax(tc.target, axis=0), labels)
    with pytest.raises(dmic.DiffusionMICError):
        task.make_card(ds, {"task": {"inputs": ["CT"]}})


def test_lesion_oversampling_centres_crops_on_lesions(phantom_dir):
    task, ds = get_task("segment"), read_dataset(phantom_dir)
    card = task.make_card(ds, {"task": {"inputs": ["FLAIR"], "focus": ["lesion"], "oversample": 1.0}})
    cases = task.training_cases(card, ds, ds.cases[:2])
    assert all(len(c.focus[0]) == int((np.argmax(c.target, axis=0) == 4).sum()) > 0 for c in cases)

    def lesion_centre_fraction(fraction: float) -> float:
        batch = next(random_batches(cases, spatial_dims=2, patch=[32, 32], batch_size=64, seed=3, focus_fraction=fraction))
        return float((batch.target[:, 4, 16, 16] > 0).float().mean())
    assert lesion_centre_fraction(1.0) == 1.0 and lesion_centre_fraction(0.0) < 0.1
    with pytest.raises(dmic.DiffusionMICError, match="focus"):
        task.make_card(ds, {"task": {"focus": ["tumour"]}})


def test_largest_component_drops_stray_labels():
    from DiffusionMICLib.tasks.segment import largest_component
    labels = np.zeros((6, 8, 8), np.uint8)
    labels[1:5, 1:5, 1:5] = 2
    labels[2, 2, 2] = 4                # inside the brain: kept
    labels[5, 7, 7] = labels[0, 7, 0] = 3   # strays: dropped
    out = largest_component(labels)
    assert out.dtype == np.uint8 and out[2, 2, 2] == 4 and out[5, 7, 7] == out[0, 7, 0] == 0
    assert (out > 0).sum() == 64 and np.array_equal(largest_component(out), out)


def test_segmentation_metrics_use_spacing():
    ref = np.zeros((20, 20, 20), np.uint8)
    ref[5:15, 5:15, 5:15] = 1
    pred = np.zeros_like(ref)
    pred[5:15, 5:15, 6:16] = 1        # shifted one voxel along x
    pred[0:2, 0:2, 0:2] = 2           # a label the reference lacks
    geom = Geometry((20, 20, 20), (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    m = segmentation_metrics(Volume(pred, geom), Volume(ref, geom), {"background": 0, "a": 1, "b": 2, "c": 3})
    a = m["labels"]["a"]
    assert a["dice"] == pytest.approx(0.9) and a["iou"] == pytest.approx(900 / 1100)
    assert a["hd95_mm"] == pytest.approx(2.0)      # one voxel along x is 2 mm
    assert m["labels"]["b"] == {"value": 2, "dice": 0.0, "iou": 0.0, "hd95_mm": None, "voxels_pred": 8, "voxels_ref": 0}
    assert m["labels"]["c"]["dice"] == 1.0 and "background" not in m["labels"]
    assert m["mean_dice"] == pytest.approx((0.9 + 0 + 1) / 3)
    json.dumps(m, allow_nan=False)


def test_oblique_input_label_map_and_uncertainty(tiny_model, heldout_dir, tmp_path):
    vols = [oblique(v) for v in small(heldout_dir, "phantom_000", ["T1", "T2"])]
    paths = [write_volume(v, tmp_path / f"in{i}.nii.gz") for i, v in enumerate(vols)]
    inputs = [read_volume(p) for p in paths]      # NIfTI: the geometry as float32 stored it
    res = dmic.segment(inputs, tiny_model, steps=2, ensemble=2, device="cpu")
    seg, unc = res.outputs["output"], res.outputs["uncertainty"]
    for v in (seg, unc):
        assert v.geometry.same_as(inputs[0].geometry, tol=1e-9) and v.array.shape == vols[0].array.shape
    assert seg.array.dtype == np.uint8 and set(np.unique(seg.array)) <= set(LABELS.values())
    assert unc.array.dtype == np.float32 and unc.array.min() >= 0 and unc.array.max() <= np.log(5) + 1e-5
    assert res.info["labels"] == LABELS and res.info["ensemble"] == 2


def test_seed_and_ensemble(tiny_model, heldout_dir):
    vols = small(heldout_dir, "phantom_000", ["T1", "T2"])
    run = lambda **kw: dmic.segment(vols, tiny_model, steps=2, device="cpu", **kw).outputs  # noqa: E731
    a, b, c = run(seed=1), run(seed=1), run(seed=2)
    assert all(np.array_equal(a[k].array, b[k].array) for k in ("output", "uncertainty"))
    assert not np.array_equal(a["uncertainty"].array, c["uncertainty"].array)
    e = run(seed=1, ensemble=3)
    # disagreeing draws raise the entropy of the mean on average
    assert e["uncertainty"].array.mean() > a["uncertainty"].array.mean()


def test_cli_run_with_uncertainty_and_evaluate(tiny_model, heldout_dir, tmp_path, capsys):
    t1, t2 = (write_volume(v, tmp_path / f"{n}.nii.gz")
              for v, n in zip(small(heldout_dir, "phantom_000", ["T1", "T2"]), ["t1", "t2"]))
    ref = write_volume(sub_volume(read_volume(heldout_dir / "labelsTr" / "phantom_000.nii.gz"), (40, 50), (28, 76), (20, 60)),
                       tmp_path / "ref.nii.gz")
    out = tmp_path / "seg.nii.gz"
    assert cli_main(["run", "segment", "--model", str(tiny_model), "--input", str(t1), "--output", str(out),
                     "--progress", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "2 input volume" in err and not out.exists()
    assert cli_main(["run", "segment", "--model", str(tiny_model), "--input", str(t1), "--input", str(t2),
                     "--output", str(out), "--steps", "2", "--ensemble", "2", "--progress", "none"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["outputs"] == {"output": str(out), "uncertainty": str(tmp_path / "seg-uncertainty.nii.gz")}
    named = tmp_path / "unc.nrrd"
    assert cli_main(["run", "segment", "--model", str(tiny_model), "--input", str(t1), "--input", str(t2),
                     "--output", str(out), "--steps", "2", "--uncertainty", str(named), "--progress", "none"]) == 0
    assert json.loads(capsys.readouterr().out)["outputs"]["uncertainty"] == str(named) and named.is_file()
    assert cli_main(["evaluate", "segment", "--pred", str(out), "--ref", str(ref)]) == 0
    m = json.loads(capsys.readouterr().out)
    assert {"mean_dice", "mean_iou", "mean_hd95_mm", "labels"} <= set(m)
    assert {"dice", "iou", "hd95_mm"} <= set(m["labels"]["2"])


def test_msd_layout_trains(phantom_dir, tmp_path):
    msd = write_msd(phantom_dir, tmp_path / "msd")
    card = train("segment", msd, tmp_path / "model", max_steps=2, device="cpu",
                 settings=tiny_settings_for({"task": {"inputs": ["T2", "FLAIR"]}}))
    assert card.training["steps"] == 2 and card.labels == LABELS and card.network["in_channels"] == 5 + 2


# The card's schedule (x0 prediction, Fast-DDPM) with a high learning rate and a short EMA:
# LEARN_STEPS steps (about a minute on two CPU cores) segment CSF/GM/WM far better than an empty mask.
LEARN = {"task": {"inputs": ["T1", "T2"]},
         "train": {"batch_size": 8, "lr": 1e-3, "ema_decay": 0.9, "ema_start": 20, "amp": False,
                   "checkpoint_every": 10_000}}
LEARN_STEPS = 60


def test_learns_to_beat_an_empty_mask(phantom_dir, heldout_dir, tmp_path):
    t0 = time.perf_counter()
    train("segment", phantom_dir, tmp_path / "model", max_steps=LEARN_STEPS, settings=tiny_settings_for(LEARN),
          device="cpu")
    z = (38, 50)
    vols = [sub_volume(image(heldout_dir, "phantom_000", c), z) for c in ("T1", "T2")]
    ref = sub_volume(read_volume(heldout_dir / "labelsTr" / "phantom_000.nii.gz"), z)
    seg = dmic.segment(vols, tmp_path / "model", device="cpu").outputs["output"]
    got = dmic.evaluate("segment", seg, ref)
    empty = dmic.evaluate("segment", seg.with_array(np.zeros_like(seg.array)), ref)
    tissue = np.mean([got["labels"][k]["dice"] for k in ("1", "2", "3")])
    print(f"segment Dice {got['mean_dice']:.3f} (tissues {tissue:.3f}; empty {empty['mean_dice']:.3f}), "
          f"{time.perf_counter() - t0:.0f} s")
    assert got["mean_dice"] > empty["mean_dice"] + 0.3 and tissue > 0.5


def test_calibration_and_uncertainty_measures_on_constructed_cases():
    """Known answers: confident and right is calibrated (ECE 0); 0.9 confidence on a label that is
    right half the time is off by 0.4; an uncertainty map equal to the errors finds them exactly,
    its opposite not at all."""
    from DiffusionMICLib.metrics import calibration_error, uncertainty_error_agreement
    ref = np.zeros((1, 10, 10), np.uint8)
    ref[0, :5] = 1
    ref[0, 5:] = 2
    values = [0, 1, 2]
    one_hot = np.stack([ref == v for v in values]).astype(np.float32)
    assert calibration_error(one_hot, ref, values) == pytest.approx(0.0, abs=1e-6)
    overconfident = np.zeros((3, 1, 10, 10), np.float32)
    overconfident[1], overconfident[2] = 0.9, 0.1          # label 1 everywhere at 0.9; right on half
    assert calibration_error(overconfident, ref, values) == pytest.approx(0.4, abs=1e-6)
    inside = np.zeros(ref.shape, bool)
    inside[0, :5] = True                                   # only where label 1 is right
    assert calibration_error(overconfident, ref, values, inside) == pytest.approx(0.1, abs=1e-6)
    with pytest.raises(DiffusionMICError, match="calibration"):
        calibration_error(overconfident[:2], ref, values)

    geometry = Geometry((10, 10, 1), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    reference = Volume(ref, geometry)
    pred = reference.with_array(np.where(np.arange(10)[None, None, :] < 3, 0, ref).astype(np.uint8))
    errors = (pred.array != ref).astype(np.float32)
    exact = uncertainty_error_agreement(reference.with_array(errors), pred, reference)
    assert exact == {"auroc": pytest.approx(1.0), "auprc": pytest.approx(1.0), "dice": pytest.approx(1.0)}
    opposite = uncertainty_error_agreement(reference.with_array(1.0 - errors), pred, reference)
    assert opposite["auroc"] == pytest.approx(0.0)


def test_dice_ce_term_on_the_x0_prediction(phantom_dir):
    """{"task": {"dice_ce": W}}: W x Dice-CE of the x0 prediction, small for the right one-hot map,
    large for a wrong one; refused for a model that does not predict x0, or a negative weight."""
    import torch
    from DiffusionMICLib.engine.network import build_network
    from DiffusionMICLib.engine.trainer import Batch, TrainConfig, Trainer
    task, ds = get_task("segment"), read_dataset(phantom_dir)
    card = task.make_card(ds, {"task": {"dice_ce": 2.0}})
    assert card.training["dice_ce"] == 2.0 and task.training_loss(task.make_card(ds, {})) is None
    loss = task.training_loss(card)
    labels = torch.randint(0, 5, (2, 16, 16))
    target = torch.nn.functional.one_hot(labels, 5).permute(0, 3, 1, 2).float() * 2 - 1
    right, wrong = loss(target, Batch(target)), loss(target.roll(1, dims=1), Batch(target))
    assert float(right) < 0.2 and float(wrong) > 5 * float(right)
    eps = task.make_card(ds, {"task": {"dice_ce": 1.0}, "schedule": {"prediction_type": "epsilon"}})
    with pytest.raises(DiffusionMICError, match="x0 prediction"):
        Trainer(build_network(eps.network), eps.noise_schedule, TrainConfig(), torch.device("cpu"),
                x0_loss=task.training_loss(eps))
    with pytest.raises(DiffusionMICError, match="dice_ce"):
        task.make_card(ds, {"task": {"dice_ce": -1}})


def test_mirroring_in_training_and_in_the_ensemble(phantom_dir, tiny_model):
    """{"task": {"mirror": true}}: training crops flipped left-right with their conditioning, and the
    ensemble's every second draw is of the mirrored input, mirrored back, its crop mirrored with it."""
    from dataclasses import replace

    import torch
    from DiffusionMICLib.engine.sampling import sample_draws
    from DiffusionMICLib.engine.trainer import Batch
    from DiffusionMICLib.models import load_model
    from DiffusionMICLib.progress import Progress
    from DiffusionMICLib.tasks.base import RunOptions
    from DiffusionMICLib.tasks.segment import mirrored_draws
    task, ds = get_task("segment"), read_dataset(phantom_dir)
    card = task.make_card(ds, {"task": {"mirror": True}})
    assert card.defaults["mirror"] and card.training["mirror"] and task.augment(task.make_card(ds, {})) is None
    x = torch.randn(64, 1, 4, 6)
    out = task.augment(card)(Batch(x, 2 * x), torch.Generator().manual_seed(0))
    flipped = (out.target == x.flip(-1)).flatten(1).all(1)
    assert ((out.target == x).flatten(1).all(1) | flipped).all() and 16 < int(flipped.sum()) < 48
    assert torch.equal(out.cond, 2 * out.target)

    card, network = load_model(tiny_model)
    cond = np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 24)).astype(np.float32)
    crop = (slice(0, 3), slice(2, 14), slice(1, 9))          # off-centre in x
    options = RunOptions(steps=2, seed=5, ensemble=3).with_card_defaults(card)
    cpu = torch.device("cpu")
    draws = list(mirrored_draws(card, network, cond, options, device=cpu, progress=Progress(), crop=crop))

    def plain(c: np.ndarray, seed: int, region: tuple[slice, ...]) -> np.ndarray:
        one = replace(options, seed=seed, ensemble=1)
        return next(sample_draws(card, network, c, one, device=cpu, progress=Progress(), crop=region))
    assert np.array_equal(draws[0], plain(cond, 5, crop)) and np.array_equal(draws[2], plain(cond, 7, crop))
    assert np.allclose(draws[1], plain(np.ascontiguousarray(cond[..., ::-1]), 6, crop[:2] + (slice(15, 23),))[..., ::-1])
    outside = np.ones(cond.shape[1:], bool)
    outside[crop] = False
    assert (draws[1][:, outside] == -1).all() and (draws[1][(slice(None), *crop)] != -1).any()
