"""Generation: a 3D whole-volume model on a coarse grid, counts, seeds, classes/guidance, metrics, CLI."""
import json

import numpy as np
import pytest
import torch

import DiffusionMICLib as dmic
from DiffusionMICLib.cli import main as cli_main
from DiffusionMICLib.datasets import read_dataset
from DiffusionMICLib.engine.network import build_network
from DiffusionMICLib.engine.pipeline import train
from DiffusionMICLib.errors import DiffusionMICError
from DiffusionMICLib.metrics import generation_metrics
from DiffusionMICLib.models import load_model, save_model
from DiffusionMICLib.progress import Progress
from DiffusionMICLib.tasks import RunOptions, get_task
from DiffusionMICLib.tasks.generate import output_grid, sample_key
from DiffusionMICLib.volume import Geometry, Volume, read_volume

STEPS = 120
# 8 mm grid (24 x 26 x 22 voxels), x0 prediction and Fast-DDPM (10 timesteps): learns the
# brain's shape and intensities within ~100 steps on a CPU (v-prediction needs many more).
SETTINGS = {"network": {"channels": [16, 32], "norm_num_groups": 16}, "task": {"spacing": [8.0, 8.0, 8.0]},
            "schedule": {"train_steps": 10, "prediction_type": "sample"}, "sampler": {"steps": 10},
            "train": {"batch_size": 2, "lr": 1e-3, "ema_decay": 0.95, "ema_start": 20, "checkpoint_every": 1000}}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory, phantom_dir):
    out = tmp_path_factory.mktemp("models") / "generate"
    train("generate", phantom_dir, out, max_steps=STEPS, settings=SETTINGS)
    return out


@pytest.fixture(scope="module")
def reals(phantom_dir, heldout_dir):
    return [read_volume(phantom_dir / "imagesTr" / f"phantom_00{i}_0000.nii.gz") for i in range(3)] + \
           [read_volume(heldout_dir / "imagesTr" / "phantom_000_0000.nii.gz")]


def untrained_samples(model_dir, count=3):
    from conftest import perturb
    card, _ = load_model(model_dir)
    net = perturb(build_network(card.network)).eval()
    with torch.inference_mode():
        res = get_task("generate").run(card, net, [], RunOptions(count=count).with_card_defaults(card), Progress(),
                                       torch.device("cpu"))
    return list(res.outputs.values())


def test_card_grid_and_samples(model):
    card, _ = load_model(model)
    grid = Geometry.from_dict(card.grid)
    assert card.task == "generate" and card.inputs == [] and card.outputs == ["T1"] and card.spatial_dims == 3
    assert grid.spacing == (8.0, 8.0, 8.0) and all(s % 2 == 0 for s in grid.size)
    assert card.patch == list(grid.size[::-1])
    res = dmic.generate(model, count=2, seed=4)
    assert list(res.outputs) == ["output", "2"]
    a, b = res.outputs["output"], res.outputs["2"]
    assert a.geometry.same_as(grid, tol=1e-9) and a.array.dtype == np.float32 and (a.array >= 0).all()
    assert not np.array_equal(a.array, b.array)
    again = dmic.generate(model, count=1, seed=4).outputs["output"]
    np.testing.assert_array_equal(again.array, a.array)                       # seed -> same sample
    np.testing.assert_array_equal(dmic.generate(model, seed=5).outputs["output"].array, b.array)   # seed + i
    assert res.info["count"] == 2 and res.info["condition"] is None


def test_learns_intensity_statistics(model, reals):
    """Learning: the samples' intensities, tissue layout and features move toward the real subjects'."""
    trained = generation_metrics(list(dmic.generate(model, count=3, seed=0).outputs.values()), reals)
    before = generation_metrics(untrained_samples(model), reals)
    assert trained["intensity_w1"] < 0.8 * before["intensity_w1"], (trained, before)
    assert trained["quantile_mae"] < before["quantile_mae"]
    assert trained["mmd"] < before["mmd"]
    real_fg = trained["foreground_fraction"]["reals"]
    gap = {k: abs(m["foreground_fraction"]["samples"] - real_fg) for k, m in (("trained", trained), ("before", before))}
    assert gap["trained"] < gap["before"]


def test_generation_metrics_fields(reals):
    m = generation_metrics(reals[:2], reals[2:])
    assert {"intensity_quantiles", "intensity_w1", "tissue_means", "tissue_fractions", "tissue_mean_mae",
            "diversity", "mmd", "foreground_fraction"} <= set(m)
    assert m["intensity_w1"] < 0.05 and m["tissue_mean_mae"] < 0.05       # real vs real: close
    means = m["tissue_means"]["samples"]
    assert len(means) == 3 and sorted(means) == means
    assert m["diversity"]["metric"].startswith("ms-ssim") and 0 < m["diversity"]["samples_pairwise"] <= 1
    same = generation_metrics([reals[0], reals[0]], reals[:2])
    assert same["diversity"]["samples_pairwise"] == pytest.approx(1.0, abs=1e-4)
    assert generation_metrics([reals[0]], [reals[1]])["mmd"] is None
    assert generation_metrics([reals[0]], [reals[0]])["sharpness"]["ratio"] == pytest.approx(1.0)


def test_edge_sharpness_falls_with_blur(reals):
    """A smoothed volume is less sharp than the reals, and the ratio says so; the scale does not matter."""
    from scipy import ndimage
    v = reals[0]
    blurred = v.with_array(ndimage.gaussian_filter(v.array.astype(np.float32), 1.5))
    ratio = generation_metrics([blurred], [v])["sharpness"]["ratio"]
    assert ratio < 0.7, ratio
    scaled = generation_metrics([v.with_array(v.array * 3.0)], [v])["sharpness"]["ratio"]
    assert scaled == pytest.approx(1.0, abs=1e-3)


def test_class_conditional_guidance_and_errors(phantom_dir, tmp_path, model):
    """An (untrained) lesion-conditional model: classes from the label maps and healthyTr, CFG runs."""
    from conftest import perturb
    task = get_task("generate")
    dataset = read_dataset(phantom_dir)
    card = task.make_card(dataset, {**SETTINGS, "task": {"spacing": [12.0, 12.0, 12.0], "classes": "lesion"}})
    assert card.classes == ["healthy", "lesion"] and card.network["num_class_embeds"] == 3
    cases = task.training_cases(card, dataset, dataset.cases[:1])
    assert [c.label for c in cases] == [1, 0]              # acquired (lesions) and healthyTr
    assert cases[0].target.shape == (1, *card.patch)
    folder = save_model(tmp_path / "cond", card, perturb(build_network(card.network)))
    a = dmic.generate(folder, condition="lesion", guidance=3.0, seed=1).outputs["output"]
    b = dmic.generate(folder, condition="healthy", guidance=3.0, seed=1).outputs["output"]
    u = dmic.generate(folder, seed=1)
    assert u.info["condition"] == "unconditional"
    assert not np.array_equal(a.array, b.array)
    with pytest.raises(DiffusionMICError, match="unknown condition"):
        dmic.generate(folder, condition="tumour")
    with pytest.raises(DiffusionMICError, match="unconditional"):
        dmic.generate(model, condition="lesion")
    modality = task.make_card(dataset, {**SETTINGS, "task": {"classes": "modality", "spacing": [12.0, 12.0, 12.0]}})
    assert modality.classes == ["T1", "T2", "PD", "FLAIR"] and modality.outputs == ["image"]
    assert [c.label for c in task.training_cases(modality, dataset, dataset.cases[:1])] == [0, 1, 2, 3]


def test_lesion_weight_marks_the_lesions_in_both_twins(phantom_dir, tmp_path, capsys):
    """lesion_weight: 1 + w on the grid voxels of the case's lesion label, the same map for its
    lesion example and its healthy twin, flipped with the image; one line without classes 'lesion'."""
    task = get_task("generate")
    dataset = read_dataset(phantom_dir)
    spec = {"spacing": [8.0, 8.0, 8.0], "classes": "lesion", "lesion_weight": 9.0}
    card = task.make_card(dataset, {**SETTINGS, "task": spec})
    sick, healthy = task.training_cases(card, dataset, dataset.cases[:1])
    assert sick.weight is healthy.weight and sick.weight.shape == sick.target.shape[1:]
    assert set(np.unique(sick.weight)) == {1.0, 10.0}
    lesion = read_volume(phantom_dir / "labelsTr" / "phantom_000.nii.gz")
    from DiffusionMICLib.tasks.generate import onto_grid
    soft = onto_grid(lesion.with_array((lesion.array == 4).astype(np.float32)), Geometry.from_dict(card.grid))
    assert np.array_equal(sick.weight > 1, soft > 0.1) and 0 < (sick.weight > 1).mean() < 0.05
    assert (sick.target[0][sick.weight > 1].mean() != healthy.target[0][sick.weight > 1].mean())
    flip = task.augment(card)
    from DiffusionMICLib.engine.trainer import Batch
    batch = Batch(torch.from_numpy(sick.target[None]), None, None, torch.from_numpy(sick.weight[None, None]))
    flipped = flip(batch, torch.Generator().manual_seed(0))
    for b in (flipped,) + tuple(flip(batch, torch.Generator().manual_seed(k)) for k in (1, 2, 3)):
        mirrored = torch.equal(b.target, batch.target.flip(-1))
        assert torch.equal(b.weight, batch.weight.flip(-1) if mirrored else batch.weight)
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({**SETTINGS, "task": {"spacing": [8.0, 8.0, 8.0], "lesion_weight": 5}}), encoding="utf-8")
    assert cli_main(["train", "generate", "--data", str(phantom_dir), "--out", str(tmp_path / "out"),
                     "--config", str(config), "--max-steps", "1", "--progress", "none"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lesion_weight" in err[0] and not (tmp_path / "out").exists()


def test_weighted_loss_counts_the_weighted_voxels():
    """The trainer's per-voxel weight: a weight of 1 everywhere is the plain mean; a weight on one
    voxel moves the loss toward that voxel's error."""
    from DiffusionMICLib.engine.trainer import weighted_mean
    error = torch.zeros(2, 1, 4, 4, 4)
    error[0, 0, 1, 1, 1] = 64.0
    assert weighted_mean(error, None) == weighted_mean(error, torch.ones(2, 1, 4, 4, 4)) == 0.5
    weight = torch.ones(2, 1, 4, 4, 4)
    weight[0, 0, 1, 1, 1] = 129.0
    assert torch.isclose(weighted_mean(error, weight), torch.tensor(64.0 * 129 / 256))


def test_output_grid_and_keys():
    g = Geometry((80, 104, 88), (2.0, 2.0, 2.0), (79.0, 111.0, -71.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    grid = output_grid(Volume(np.zeros((88, 104, 80), np.float32), g), [6.0, 6.0, 6.0], 4)
    assert all(s % 4 == 0 for s in grid.size) and grid.spacing == (6.0, 6.0, 6.0)
    centre = lambda geo: np.asarray(geo.origin) + np.reshape(geo.direction, (3, 3)) @ (  # noqa: E731
        (np.asarray(geo.size) - 1) / 2 * np.asarray(geo.spacing))
    np.testing.assert_allclose(centre(grid), centre(g), atol=1e-6)     # the same box centre
    assert all(n * s >= 160 for n, s in zip(grid.size, grid.spacing))
    assert [sample_key(i, c, ch) for i, c, ch in [(0, 0, "T1"), (1, 0, "T1"), (0, 1, "T2"), (2, 1, "T2")]] == \
           ["output", "2", "T2", "3-T2"]


def test_cli_count_evaluate_and_errors(model, reals, phantom_dir, tmp_path, capsys):
    out = tmp_path / "gen.nii.gz"
    assert cli_main(["run", "generate", "--model", str(model), "--output", str(out), "--count", "2",
                     "--seed", "7", "--progress", "none"]) == 0
    printed = json.loads(capsys.readouterr().out)
    second = tmp_path / "gen-2.nii.gz"
    assert printed["outputs"] == {"output": str(out), "2": str(second)} and printed["seed"] == 7
    a, b = read_volume(out), read_volume(second)
    assert not np.array_equal(a.array, b.array)
    real = [str(phantom_dir / "imagesTr" / f"phantom_00{i}_0000.nii.gz") for i in range(2)]
    assert cli_main(["evaluate", "generate", "--pred", str(out), str(second), "--ref", *real]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["samples"] == 2 and metrics["reals"] == 2 and metrics["mmd"] is not None
    bad = tmp_path / "bad.nii.gz"
    for args in (["--input", real[0]], ["--condition", "lesion"], ["--count", "0"]):
        assert cli_main(["run", "generate", "--model", str(model), "--output", str(bad), "--progress", "none",
                         *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("diffusion-mic: error:") and "\n" not in err
        assert not bad.exists()


def test_bright_tail_fractions_see_flair_lesions(phantom_dir):
    """The lesion-condition measure: real lesion subjects' FLAIR goes above healthy tissue, healthy does not."""
    from DiffusionMICLib.metrics import bright_tail_fractions
    lesion = [read_volume(phantom_dir / "cleanTr" / f"phantom_00{i}_0003.nii.gz") for i in range(3)]
    healthy = [read_volume(phantom_dir / "healthyTr" / f"phantom_00{i}_0003.nii.gz") for i in range(3)]
    m = bright_tail_fractions({"lesion": lesion, "healthy": healthy}, healthy)
    assert m["healthy"] == pytest.approx(0.001, abs=0.0005)
    assert m["lesion"] > 2 * m["healthy"], m
    with pytest.raises(DiffusionMICError, match="healthy"):
        bright_tail_fractions({"lesion": lesion}, [])
