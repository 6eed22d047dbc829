"""Modality conversion end to end: card, training pairs, run on any grid, ensemble, CLI, learning."""
import json
import time

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

import DiffusionMICLib as dmic
from DiffusionMICLib.cli import main as cli_main
from DiffusionMICLib.datasets import read_dataset
from DiffusionMICLib.engine.pipeline import train
from DiffusionMICLib.engine.space import ModelSpace, robust_scale
from DiffusionMICLib.models import load_model, save_model
from DiffusionMICLib.tasks import get_task
from DiffusionMICLib.volume import Geometry, Volume, read_volume, write_volume

CHANNEL = {"T1": 0, "T2": 1, "PD": 2, "FLAIR": 3}


def image(root, case, channel, variant="imagesTr"):
    return read_volume(root / variant / f"{case}_{CHANNEL[channel]:04d}.nii.gz")


def sub_volume(vol: Volume, z: tuple[int, int], y: tuple[int, int] | None = None,
               x: tuple[int, int] | None = None) -> Volume:
    """A crop of a volume with the geometry of that crop (origin moved along the direction)."""
    y, x = y or (0, vol.array.shape[1]), x or (0, vol.array.shape[2])
    g = vol.geometry
    start = np.array([x[0], y[0], z[0]], float)
    origin = np.asarray(g.origin) + np.reshape(g.direction, (3, 3)) @ (np.asarray(g.spacing) * start)
    arr = np.ascontiguousarray(vol.array[z[0]:z[1], y[0]:y[1], x[0]:x[1]])
    return Volume(arr, Geometry(arr.shape[::-1], g.spacing, tuple(origin), g.direction))


def oblique(vol: Volume) -> Volume:
    """The same voxels with axes permuted/flipped, an oblique direction and anisotropic spacing."""
    arr = np.ascontiguousarray(np.flip(vol.array.transpose(1, 0, 2), axis=2))
    rot = Rotation.from_euler("xyz", [17, -9, 23], degrees=True).as_matrix() @ np.array([[0, 1, 0], [0, 0, -1], [-1, 0, 0]])
    return Volume(arr, Geometry(arr.shape[::-1], (2.0, 2.4, 1.7), (-31.5, 12.25, 80.0), tuple(rot.flatten())))


def small(root, case, channels, variant="imagesTr"):
    """A small block (10 slices, 48 x 40) through the middle of the brain: cheap to run."""
    return [sub_volume(image(root, case, c, variant), (40, 50), (28, 76), (20, 60)) for c in channels]


def tiny_settings_for(extra=None):
    from conftest import TINY_NETWORK
    return {"network": dict(TINY_NETWORK), "patch": [48, 48],
            "train": {"batch_size": 4, "ema_start": 20, "checkpoint_every": 1000}, **(extra or {})}


def perturbed_model(tmp_path_factory, data, task, name, settings=None):
    """A model trained 2 steps, then perturbed so that its outputs depend on everything."""
    from conftest import perturb
    out = tmp_path_factory.mktemp("models") / name
    train(task, data, out, max_steps=2, settings=tiny_settings_for(settings), device="cpu")
    card, net = load_model(out)
    save_model(out, card, perturb(net, seed=1, scale=0.05))
    return out


def write_msd(src, out, cases=("phantom_000",)):
    """An MSD-layout data set (one 4D image per case, `modality`, `labels`, `training`) from phantom files."""
    meta = json.loads((src / "dataset.json").read_text(encoding="utf-8"))
    names = [meta["channel_names"][k] for k in sorted(meta["channel_names"], key=int)]
    (out / "imagesTr").mkdir(parents=True)
    (out / "labelsTr").mkdir()
    training = []
    for case in cases:
        vols = [sitk.ReadImage(str(src / "imagesTr" / f"{case}_{i:04d}.nii.gz")) for i in range(len(names))]
        sitk.WriteImage(sitk.JoinSeries(vols), str(out / "imagesTr" / f"{case}.nii.gz"))
        sitk.WriteImage(sitk.ReadImage(str(src / "labelsTr" / f"{case}.nii.gz")), str(out / "labelsTr" / f"{case}.nii.gz"))
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    (out / "dataset.json").write_text(json.dumps({
        "name": "phantom-msd", "modality": {str(i): n for i, n in enumerate(names)},
        "labels": {str(v): k for k, v in meta["labels"].items()}, "numTraining": len(training),
        "training": training, "test": []}), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, phantom_dir):
    return perturbed_model(tmp_path_factory, phantom_dir, "translate", "tiny-translate")


def test_card_defaults_and_choices(phantom_dir):
    task, ds = get_task("translate"), read_dataset(phantom_dir)
    card = task.make_card(ds, {})
    assert (card.inputs, card.outputs, card.network["in_channels"]) == (["T1", "T2"], ["FLAIR"], 3)
    assert card.normalisation == {"method": "percentile", "percentile": 99.5, "value": 1.0}
    assert card.noise_schedule.prediction_type == "sample" and card.noise_schedule.train_steps == 10
    card = task.make_card(ds, {"task": {"inputs": ["T1"], "output": "T2"}})
    assert (card.inputs, card.outputs, card.network["in_channels"]) == (["T1"], ["T2"], 2)
    for bad in ({"inputs": ["T1"], "output": "CT"}, {"inputs": ["T1"], "output": "T1"}, {"inputs": []}):
        with pytest.raises(dmic.DiffusionMICError):
            task.make_card(ds, {"task": bad})


def test_training_pairs_noisy_inputs_clean_target(phantom_dir):
    task, ds = get_task("translate"), read_dataset(phantom_dir)
    card = task.make_card(ds, {})
    case = ds.cases[0]
    (tc,) = task.training_cases(card, ds, [case])
    assert tc.cond.shape[0] == 2 and tc.target.shape[0] == 1
    t1 = image(phantom_dir, case.id, "T1").array
    flair = image(phantom_dir, case.id, "FLAIR", "cleanTr").array
    # phantom volumes are already RAS: model space is the array itself; each channel scaled on its own
    np.testing.assert_allclose(tc.cond[0], t1 / robust_scale(t1, card.normalisation) * 2 - 1, atol=1e-5)
    np.testing.assert_allclose(tc.target[0], flair / robust_scale(flair, card.normalisation) * 2 - 1, atol=1e-5)
    assert tc.foreground.mean() > 0.2


def test_oblique_input_keeps_exact_grid(tiny_model, heldout_dir, tmp_path):
    vols = [oblique(v) for v in small(heldout_dir, "phantom_000", ["T1", "T2"])]
    paths = [write_volume(v, tmp_path / f"in{i}.nrrd") for i, v in enumerate(vols)]
    res = dmic.translate([read_volume(p) for p in paths], tiny_model, steps=2, device="cpu")
    out = res.outputs["output"]
    assert out.geometry.same_as(vols[0].geometry, tol=1e-9)
    assert out.array.shape == vols[0].array.shape and out.array.dtype == np.float32
    assert np.isfinite(out.array).all() and out.array.min() >= 0
    # the model really worked on a reoriented grid (its axial slices are another array axis)
    assert ModelSpace.enter([read_volume(p) for p in paths]).arrays.shape[1:] != vols[0].array.shape


def test_seed_ensemble_and_wrong_inputs(tiny_model, heldout_dir):
    vols = small(heldout_dir, "phantom_000", ["T1", "T2"])
    run = lambda **kw: dmic.translate(vols, tiny_model, steps=2, device="cpu", **kw).outputs["output"].array  # noqa: E731
    a, b, c = run(seed=3), run(seed=3), run(seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    ens = run(seed=3, ensemble=2)   # mean of the draws of seeds 3 and 4 (before clipping/masking)
    inside = (a > 0) & (c > 0) & (ens > 0)
    np.testing.assert_allclose(ens[inside], ((a + c) / 2)[inside], atol=1e-4)
    with pytest.raises(dmic.DiffusionMICError, match="2 input volume"):
        dmic.translate(vols[:1], tiny_model, steps=2, device="cpu")


def test_cli_run_evaluate_and_errors(tiny_model, heldout_dir, tmp_path, capsys):
    vols = small(heldout_dir, "phantom_000", ["T1", "T2", "FLAIR"], "imagesTr")
    t1, t2, flair = (write_volume(v, tmp_path / f"{n}.nii.gz") for v, n in zip(vols, ["t1", "t2", "flair"]))
    out = tmp_path / "flair-syn.nrrd"
    assert cli_main(["run", "translate", "--model", str(tiny_model), "--input", str(t1), "--output", str(out),
                     "--steps", "2", "--progress", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "T1 + T2" in err and not out.exists()
    assert cli_main(["run", "translate", "--model", str(tiny_model), "--input", str(t1), "--input", str(t2),
                     "--output", str(out), "--steps", "2", "--ensemble", "2", "--progress", "none"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["outputs"] == {"output": str(out)} and info["ensemble"] == 2 and info["output_modality"] == "FLAIR"
    assert read_volume(out).geometry.same_as(vols[0].geometry)
    assert cli_main(["evaluate", "translate", "--pred", str(out), "--ref", str(flair)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["normalised"] is True and {"nmae", "psnr", "ssim"} <= set(metrics)


def test_evaluate_is_scale_free(heldout_dir):
    ref = image(heldout_dir, "phantom_000", "FLAIR", "cleanTr")
    mask = read_volume(heldout_dir / "labelsTr" / "phantom_000.nii.gz")
    pred = ref.with_array(ref.array / robust_scale(ref.array, {"percentile": 99.5}))  # the model's units
    m = dmic.evaluate("translate", pred, ref, mask)
    assert m["nmae"] < 1e-6 and m["psnr"] > 100 and m["ssim"] > 0.999


def test_msd_layout_trains(phantom_dir, tmp_path):
    msd = write_msd(phantom_dir, tmp_path / "msd")
    card = train("translate", msd, tmp_path / "model", max_steps=2, device="cpu",
                 settings=tiny_settings_for({"task": {"inputs": ["T1"], "output": "T2"}}))
    assert card.training["steps"] == 2 and card.inputs == ["T1"] and card.outputs == ["T2"]
    assert (tmp_path / "model" / "model.safetensors").is_file()


# The card's schedule (x0 prediction, Fast-DDPM on the 10 sampler timesteps) with a high learning
# rate and a short EMA learns T1+T2 -> FLAIR in LEARN_STEPS steps (about a minute on two CPU cores;
# bf16 autocast is slower than float32 there) well enough to beat copying the closest input.
LEARN = {"train": {"batch_size": 8, "lr": 1e-3, "ema_decay": 0.9, "ema_start": 20, "amp": False,
                   "checkpoint_every": 10_000}}
LEARN_STEPS = 60


def test_learns_to_beat_copying_an_input(phantom_dir, heldout_dir, tmp_path):
    t0 = time.perf_counter()
    settings = tiny_settings_for(LEARN)
    train("translate", phantom_dir, tmp_path / "model", max_steps=LEARN_STEPS, settings=settings, device="cpu")
    z = (38, 50)
    vols = [sub_volume(image(heldout_dir, "phantom_000", c), z) for c in ("T1", "T2")]
    ref = sub_volume(image(heldout_dir, "phantom_000", "FLAIR", "cleanTr"), z)
    brain = sub_volume(read_volume(heldout_dir / "labelsTr" / "phantom_000.nii.gz"), z)
    pred = dmic.translate(vols, tmp_path / "model", device="cpu").outputs["output"]
    got = dmic.evaluate("translate", pred, ref, brain)
    copies = {c: dmic.evaluate("translate", v, ref, brain)["psnr"] for c, v in zip(("T1", "T2"), vols)}
    print(f"translate PSNR {got['psnr']:.2f} dB (copy {copies}), {time.perf_counter() - t0:.0f} s")
    assert got["psnr"] > max(copies.values())

