"""Lesion-map generation: the map channel of the training cases, a UNet started from a trained one
with the new channel at zero, the training maps the card keeps, the user's lesion mask, bad input."""
import json

import numpy as np
import pytest
import torch

import DiffusionMICLib as dmic
from DiffusionMICLib.cli import main as cli_main
from DiffusionMICLib.datasets import read_dataset
from DiffusionMICLib.engine.latent import build_model
from DiffusionMICLib.engine.pipeline import start_from, train
from DiffusionMICLib.engine.trainer import Batch
from DiffusionMICLib.errors import DiffusionMICError
from DiffusionMICLib.models import load_model, read_card
from DiffusionMICLib.tasks import get_task
from DiffusionMICLib.tasks.generate import onto_grid
from DiffusionMICLib.volume import Geometry, read_volume, write_volume

pytestmark = pytest.mark.usefixtures("one_thread")

LESION = 4      # the phantom's lesion label
SETTINGS = {"network": {"channels": [16, 32], "norm_num_groups": 16},
            "task": {"spacing": [8.0, 8.0, 8.0], "classes": "lesion", "lesion_map": True},
            "schedule": {"train_steps": 10, "prediction_type": "sample"}, "sampler": {"steps": 2},
            "train": {"batch_size": 2, "checkpoint_every": 1000}}


@pytest.fixture(scope="module")
def models(tmp_path_factory, phantom_dir):
    """A class-conditional model without the map (2 steps) and a lesion-map model started from it (2 steps)."""
    out = tmp_path_factory.mktemp("lesion-map")
    plain = {**SETTINGS, "task": {**SETTINGS["task"], "lesion_map": False}}
    train("generate", phantom_dir, out / "plain", max_steps=2, settings=plain)
    train("generate", phantom_dir, out / "map", max_steps=2, settings={**SETTINGS, "init": str(out / "plain")})
    return out / "plain", out / "map"


def lesion_fractions(phantom_dir, grid: Geometry, case: str = "phantom_000") -> np.ndarray:
    labels = read_volume(phantom_dir / "labelsTr" / f"{case}.nii.gz")
    return np.clip(onto_grid(labels.with_array((labels.array == LESION).astype(np.float32)), grid), 0, 1)


def test_training_cases_carry_the_lesion_map(phantom_dir, tmp_path, capsys):
    """The lesion example's extra channel is its lesion fraction per grid voxel, its healthy twin's
    zeros; the map flips with the image; lesion_map without classes 'lesion' is one line."""
    task = get_task("generate")
    dataset = read_dataset(phantom_dir)
    card = task.make_card(dataset, SETTINGS)
    assert card.network["in_channels"] == 2 and card.network["out_channels"] == 1
    assert card.training["lesion_label"] == LESION
    sick, healthy = task.training_cases(card, dataset, dataset.cases[:1])
    soft = lesion_fractions(phantom_dir, Geometry.from_dict(card.grid))
    assert sick.cond.shape == (1, *sick.target.shape[1:]) and soft.max() > 0.2
    assert np.allclose(sick.cond[0], soft) and not healthy.cond.any()
    batch = Batch(torch.from_numpy(sick.target[None]), torch.from_numpy(sick.cond[None]), None, None)
    flip = task.augment(card)
    for k in range(4):
        b = flip(batch, torch.Generator().manual_seed(k))
        mirrored = torch.equal(b.target, batch.target.flip(-1))
        assert torch.equal(b.cond, batch.cond.flip(-1) if mirrored else batch.cond)
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({**SETTINGS, "task": {"spacing": [8.0, 8.0, 8.0], "lesion_map": True}}),
                      encoding="utf-8")
    assert cli_main(["train", "generate", "--data", str(phantom_dir), "--out", str(tmp_path / "out"),
                     "--config", str(config), "--max-steps", "1", "--progress", "none"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lesion_map" in err[0] and not (tmp_path / "out").exists()


def test_start_from_gives_the_new_channel_no_effect(models, phantom_dir):
    """A UNet started from a trained one predicts what that one does, whatever the map holds; a
    network of another architecture is refused in one line."""
    plain, _ = models
    card, base = load_model(plain)
    mapped = get_task("generate").make_card(read_dataset(phantom_dir), SETTINGS)
    net = build_model(mapped.network, None)
    info = start_from(net, plain)
    assert info == {"model": card.name, "sha256": card.sha256}
    x = torch.randn(1, 1, *card.patch, generator=torch.Generator().manual_seed(0))
    lesions = torch.rand(1, 1, *card.patch, generator=torch.Generator().manual_seed(1))
    t, label = torch.tensor([500]), torch.tensor([1])
    with torch.no_grad():
        assert torch.allclose(net.eval()(torch.cat([x, lesions], 1), t, class_labels=label),
                              base(x, t, class_labels=label), atol=1e-5)
    other = build_model({**mapped.network, "num_res_blocks": 2}, None)
    with pytest.raises(DiffusionMICError, match="init: model"):
        start_from(other, plain)


def test_run_draws_kept_maps_or_the_users_mask(models, phantom_dir, tmp_path):
    """Lesion samples draw a training map (by seed) or the given mask, whose volume is the lesion
    load; healthy samples get none; the map changes the sample."""
    plain, folder = models
    card = read_card(folder)
    assert card.training["init"]["model"] == read_card(plain).name
    dataset = read_dataset(phantom_dir)
    sick = [c for c in dataset.cases if np.any(c.read_label().array == LESION)]
    assert len(card.training["lesion_maps"]) == len(sick) > 0
    drawn = dmic.generate(folder, count=2, condition="lesion", seed=0)
    assert all(v > 0 for v in drawn.info["lesion_load_ml"])
    assert dmic.generate(folder, condition="healthy", seed=0).info["lesion_load_ml"] == [0.0]
    labels = read_volume(phantom_dir / "labelsTr" / "phantom_000.nii.gz")
    truth = float((labels.array == LESION).sum() * np.prod(labels.spacing) / 1000)
    given = dmic.generate(folder, condition="lesion", seed=0, labels=labels)       # a label map: its lesion label
    binary = dmic.generate(folder, condition="lesion", seed=0,
                           labels=labels.with_array((labels.array == LESION).astype(np.uint8)))
    load = given.info["lesion_load_ml"][0]
    assert load == binary.info["lesion_load_ml"][0] and abs(load - truth) < 0.25 * truth
    assert np.array_equal(given.outputs["output"].array, binary.outputs["output"].array)
    healthy = dmic.generate(folder, condition="healthy", seed=0)
    assert not np.array_equal(given.outputs["output"].array, healthy.outputs["output"].array)


@pytest.mark.parametrize("make, condition, message", [
    (lambda lab: lab.with_array(lab.array.astype(np.float32) * 0.37), "lesion", "intensity image"),
    (lambda lab: lab.with_array(np.zeros_like(lab.array)), "lesion", "marks no lesion"),
    (lambda lab: lab.with_array(np.where(lab.array == LESION, 3, lab.array)), "lesion", "not the lesion label 4"),
    (lambda lab: lab, "healthy", "with --condition lesion")])
def test_bad_lesion_mask_one_line_nothing_written(models, phantom_dir, tmp_path, capsys, make, condition, message):
    _, folder = models
    mask = tmp_path / "mask.nii.gz"
    write_volume(make(read_volume(phantom_dir / "labelsTr" / "phantom_000.nii.gz")), mask)
    out = tmp_path / "out.nii.gz"
    assert cli_main(["run", "generate", "--model", str(folder), "--input", str(mask), "--condition", condition,
                     "--output", str(out), "--progress", "none"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert list(tmp_path.iterdir()) == [mask]


def test_guidance_against_a_negative_condition():
    """With negative_class, guidance contrasts with that class on all-zero conditioning channels:
    uncond + g (cond - uncond), uncond the negative class's prediction on an empty map."""
    from DiffusionMICLib.engine.sampler import conditioned

    def network(inp, t, class_labels):      # channel 0: the image, channel 1: the map
        return inp[:, :1] * 2 + inp[:, 1:] * 10 + class_labels.view(-1, 1, 1) * 100
    x, lesions = torch.full((1, 1, 2, 2), 1.0), torch.full((1, 1, 2, 2), 0.5)
    lesion = torch.tensor([1])
    cond = 2 + 5 + 100
    plain = conditioned(network, lesions, lesion, null_class=2, guidance=3.0)
    assert torch.allclose(plain(x, torch.tensor(0)), torch.full_like(x, 2 + 5 + 200 + 3 * (cond - 207)))
    negative = conditioned(network, lesions, lesion, null_class=2, guidance=3.0, negative_class=0)
    assert torch.allclose(negative(x, torch.tensor(0)), torch.full_like(x, 2 + 3 * (cond - 2)))
    assert torch.allclose(conditioned(network, lesions, lesion, 2, 1.0, 0)(x, torch.tensor(0)), torch.full_like(x, cond))


def test_lesion_load_composes_training_lesions(models, tmp_path, capsys):
    """--lesion-load: a map of about that many mL made of the card's training lesions (each where it
    was, or mirrored), the same for the same seed; one line for a load they cannot make, or the
    option where it does not apply."""
    from DiffusionMICLib.tasks import lesion_maps
    _, folder = models
    card = read_card(folder)
    kept = lesion_maps.kept(card)
    whole = np.max(kept + [k[..., ::-1] for k in kept], axis=0)
    ask = max(lesion_maps.load_ml(card, k) for k in kept)      # one training subject's load
    maps = [lesion_maps.composed(card, seed, ask) for seed in range(3)]
    for m in maps:
        assert abs(lesion_maps.load_ml(card, m) - ask) <= lesion_maps.LOAD_TOLERANCE * ask
        assert np.all(m <= whole + 1e-6)      # only training lesions, at their places or mirrored
    assert np.array_equal(maps[0], lesion_maps.composed(card, 0, ask))
    result = dmic.generate(folder, condition="lesion", seed=1, lesion_load=ask)
    assert result.info["lesion_load_ml"] == [lesion_maps.load_ml(card, maps[1])]
    out = tmp_path / "out.nii.gz"
    for extra, message in [(["--condition", "lesion", "--lesion-load", "1e4"], "cannot be composed"),
                           (["--condition", "healthy", "--lesion-load", str(ask)], "needs --condition lesion"),
                           (["--condition", "lesion", "--lesion-load", "-1"], "must be above 0")]:
        assert cli_main(["run", "generate", "--model", str(folder), "--output", str(out), "--progress", "none",
                         *extra]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not out.exists()
