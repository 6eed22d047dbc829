"""Latent diffusion for generation: the AutoencoderKL stage, the UNet over its latents, one
weights file, resuming without retraining the autoencoder, bad settings."""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

import DiffusionMICLib as dmic
from DiffusionMICLib.cli import main as cli_main
from DiffusionMICLib.engine.latent import LatentModel, build_model, fit_autoencoder, latent_spec
from DiffusionMICLib.engine.pipeline import train
from DiffusionMICLib.errors import DiffusionMICError
from DiffusionMICLib.models import load_model
from DiffusionMICLib.progress import Progress
from DiffusionMICLib.tasks import get_task
from DiffusionMICLib.volume import Geometry

AE_STEPS, STEPS = 6, 6
# 8 mm grid; autoencoder 2x down (latents 10 x 14 x 12), UNet 2x down: the grid is padded to multiples of 4.
SETTINGS = {"task": {"channels": ["T1", "FLAIR"], "classes": "lesion", "spacing": [8.0, 8.0, 8.0]},
            "network": {"channels": [16, 32], "norm_num_groups": 16},
            "autoencoder": {"network": {"channels": [16, 16], "latent_channels": 2}, "patch": [16, 16, 16],
                            "adversarial_start": 3, "discriminator": {"channels": 8, "num_layers_d": 2},
                            "train": {"max_steps": AE_STEPS, "batch_size": 2, "lr": 1e-3, "checkpoint_every": 3}},
            "schedule": {"train_steps": 10, "prediction_type": "sample"}, "sampler": {"steps": 2},
            "train": {"batch_size": 2, "lr": 1e-3, "checkpoint_every": 1000}}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory, phantom_dir):
    out = tmp_path_factory.mktemp("models") / "latent"
    train("generate", phantom_dir, out, max_steps=STEPS, settings=SETTINGS)
    return out


def test_autoencoder_round_trip_keeps_shapes():
    spec = latent_spec({"network": {"channels": [16, 16, 16], "latent_channels": 3}}, channels=2)
    net = build_model({"spatial_dims": 3, "in_channels": 3, "out_channels": 3, "channels": [16, 32],
                       "attention_levels": [False, False], "num_res_blocks": 1, "norm_num_groups": 16,
                       "num_head_channels": 32}, {**spec, "scale_factor": 2.0})
    assert isinstance(net, LatentModel) and net.scale_factor == 2.0
    x = torch.rand(1, 2, 16, 24, 32) * 2 - 1
    z = net.encode(x)
    assert z.shape == (1, 3, 4, 6, 8)
    assert net.decode(z).shape == x.shape
    assert net(z, torch.zeros(1, dtype=torch.long)).shape == z.shape      # the UNet runs on latents


def test_encode_and_decode_by_windows_of_the_training_crop():
    """A volume larger than the autoencoder's training crop is encoded and decoded by sliding
    windows of that crop (latent windows 4x smaller); one no larger goes through in one piece."""
    spec = latent_spec({"network": {"channels": [16, 16, 16], "latent_channels": 3}, "patch": [8, 8, 8]}, channels=2)
    net = build_model({"spatial_dims": 3, "in_channels": 3, "out_channels": 3, "channels": [16, 32],
                       "attention_levels": [False, False], "num_res_blocks": 1, "norm_num_groups": 16,
                       "num_head_channels": 32}, {**spec, "scale_factor": 1.0}).eval()
    assert net.window == (8, 8, 8) and net.factor == 4
    x = torch.rand(1, 2, 16, 24, 32) * 2 - 1
    small = x[..., :8, :8, :8]
    assert torch.equal(net.encode(small), net.autoencoder.encode(small)[0])
    z = net.encode(x)
    assert z.shape == (1, 3, 4, 6, 8) and not torch.allclose(z, net.autoencoder.encode(x)[0], atol=1e-4)
    y = net.decode(z)
    assert y.shape == x.shape and not torch.allclose(y, net.autoencoder.decode(z), atol=1e-4)


def test_card_weights_and_samples_on_the_grid(model):
    card, net = load_model(model)
    grid = Geometry.from_dict(card.grid)
    assert isinstance(net, LatentModel) and card.latent["scale_factor"] > 0
    assert card.latent["training"]["steps"] == AE_STEPS and card.training["steps"] == STEPS
    assert card.network["in_channels"] == card.network["out_channels"] == 2          # latent channels
    assert all(s % 4 == 0 for s in grid.size) and card.patch == [s // 2 for s in grid.size[::-1]]
    with safe_open(str(model / "model.safetensors"), "pt") as f:
        prefixes = {k.split(".")[0] for k in f.keys()}
    assert prefixes == {"unet", "autoencoder"}
    run = dmic.generate(model, count=2, condition="lesion", device="cpu")
    assert set(run.outputs) == {"output", "FLAIR", "2", "2-FLAIR"}
    for v in run.outputs.values():
        assert v.geometry.same_as(grid) and np.isfinite(v.array).all()
    assert np.abs(run.outputs["output"].array - run.outputs["2"].array).mean() > 1e-4     # seeds differ


def test_resume_keeps_the_finished_autoencoder(model, phantom_dir):
    before = (model / "autoencoder" / "autoencoder.safetensors").read_bytes()
    card = train("generate", phantom_dir, model, max_steps=STEPS + 2, settings=SETTINGS)
    assert card.training["steps"] == STEPS + 2 and card.latent["training"]["steps"] == AE_STEPS
    assert (model / "autoencoder" / "autoencoder.safetensors").read_bytes() == before
    _, net = load_model(model)
    with safe_open(str(model / "autoencoder" / "autoencoder.safetensors"), "pt") as f:
        for key in f.keys():
            assert torch.equal(net.autoencoder.state_dict()[key], f.get_tensor(key))


def test_a_new_unet_over_a_trained_models_autoencoder(model, phantom_dir, tmp_path):
    """"autoencoder": {"from": MODEL}: no stage 1; the new model's autoencoder is the source's,
    tensor for tensor (so its latents and scale factor are too), its card names the source, and the
    source model is left as it was."""
    before = (model / "model.safetensors").read_bytes()
    settings = {**SETTINGS, "network": {"channels": [32, 32], "norm_num_groups": 16},
                "autoencoder": {"from": str(model)}}
    out = tmp_path / "wider"
    card = train("generate", phantom_dir, out, max_steps=2, settings=settings)
    source_card, source = load_model(model)
    _, net = load_model(out)
    assert card.network["channels"] == [32, 32] and card.training["steps"] == 2
    assert card.latent["autoencoder"] == source_card.latent["autoencoder"]
    assert card.latent["stage1"] == source_card.latent["stage1"]
    assert card.latent["scale_factor"] == source_card.latent["scale_factor"]
    assert card.latent["training"]["from"] == {"model": source_card.name, "sha256": source_card.sha256}
    mine = net.autoencoder.state_dict()
    for key, value in source.autoencoder.state_dict().items():
        assert torch.equal(mine[key], value), key
    assert not (out / "autoencoder" / "checkpoint").exists()          # nothing trained in stage 1
    assert (model / "model.safetensors").read_bytes() == before


def test_autoencoder_from_a_model_that_does_not_fit_one_line_and_nothing_written(model, phantom_dir, tmp_path,
                                                                                    capsys):
    for name, autoencoder, message in [
            ("channels", {"from": str(model)}, "encodes T1, FLAIR; this model generates T1"),
            ("extra", {"from": str(model), "patch": [8, 8, 8]}, "drop the other settings (patch)"),
            ("missing", {"from": str(tmp_path / "nowhere")}, "no model folder or catalog entry")]:
        settings = {**SETTINGS, "autoencoder": autoencoder}
        if name == "channels":
            settings["task"] = {**SETTINGS["task"], "channels": ["T1"]}
        config = tmp_path / f"{name}.json"
        config.write_text(json.dumps(settings), encoding="utf-8")
        out = tmp_path / f"out-{name}"
        assert cli_main(["train", "generate", "--data", str(phantom_dir), "--out", str(out), "--config", str(config),
                         "--max-steps", "1", "--progress", "none"]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not out.exists()


def test_autoencoder_learns_the_anatomy(phantom_dir, tmp_path):
    """200 steps of 24^3 crops at 4 mm (about 25 s): the brain's reconstruction error falls below
    60 % of the error of its mean intensity (what an autoencoder that learned only the average
    gives) and below half the untrained network's (measured with seed 0: 0.45 of the mean's)."""
    from DiffusionMICLib.datasets import read_dataset
    settings = {**SETTINGS, "task": {**SETTINGS["task"], "spacing": [4.0, 4.0, 4.0]}}
    dataset = read_dataset(phantom_dir)
    task = get_task("generate")
    card = task.make_card(dataset, settings)
    cases = task.training_cases(card, dataset, dataset.cases)
    card.latent["stage1"].update({"patch": [24, 24, 24], "adversarial_weight": 0.0,
                                  "train": {**card.latent["stage1"]["train"], "max_steps": 200, "lr": 3e-3}})
    x = torch.from_numpy(cases[0].target[None])
    brain = cases[0].target > -0.95

    def error(net) -> float:
        with torch.no_grad():
            return float(np.abs(net.autoencoder.reconstruct(x)[0].numpy() - cases[0].target)[brain].mean())
    torch.manual_seed(0)      # the autoencoder's initial weights (pipeline.train seeds them from the config)
    net = build_model(card.network, card.latent)
    untrained = error(net)
    fit_autoencoder(card.latent, net, cases, tmp_path / "ae", card.noise_schedule, torch.device("cpu"), Progress())
    trained = error(net)
    floor = np.mean([np.abs(c - c[b].mean())[b].mean() for c, b in zip(cases[0].target, brain)])
    assert trained < 0.6 * floor and trained < 0.5 * untrained, (trained, floor, untrained)


def test_oversampling_centres_crops_on_rare_bright_voxels():
    """`bright` finds a small bright spot (as a FLAIR lesion) in one channel, and with oversample
    1/2 about half the autoencoder's crops contain it, against few without."""
    from DiffusionMICLib.engine.batches import TrainingCase, random_batches
    from DiffusionMICLib.engine.latent import brain, bright
    target = np.full((2, 40, 40, 40), -1.0, np.float32)
    target[:, 4:36, 4:36, 4:36] = 0.0                       # the "brain"
    target[1, 30:32, 6:8, 6:8] = 0.9                        # a lesion in a corner, channel 1 only
    spots = bright(target)
    assert len(spots) and set(map(tuple, spots)) >= {(30, 6, 6), (31, 7, 7)}
    assert brain(target)[tuple(spots.T)].all()

    def share(oversample: float) -> float:
        case = TrainingCase(target=target, foreground=brain(target), focus=[bright(target)] if oversample else None)
        batches = random_batches([case], spatial_dims=3, patch=[8, 8, 8], batch_size=50, seed=1,
                                 focus_fraction=oversample)
        crops = next(batches).target.numpy()
        return float(np.mean([(c[1] > 0.5).any() for c in crops]))
    assert share(0.5) > 0.35 and share(0.0) < 0.1


def test_encoded_cases_carry_the_loss_weight_onto_the_latent_grid():
    """A case's loss weight becomes the largest weight under each latent voxel, its conditioning
    channels their mean over it (a lesion map: the lesion fraction), both mirrored with the
    mirrored latent."""
    from DiffusionMICLib.engine.batches import TrainingCase
    from DiffusionMICLib.engine.latent import encode_cases
    spec = latent_spec({"network": {"channels": [16, 16, 16], "latent_channels": 3}}, channels=1)
    net = build_model({"spatial_dims": 3, "in_channels": 3, "out_channels": 3, "channels": [16, 32],
                       "attention_levels": [False, False], "num_res_blocks": 1, "norm_num_groups": 16,
                       "num_head_channels": 32}, {**spec, "scale_factor": 1.0})
    weight = np.ones((16, 16, 16), np.float32)
    weight[5, 6, 1] = 7.0
    cond = np.zeros((1, 16, 16, 16), np.float32)
    cond[0, 4:6, 4:8, 0:4] = 1.0              # 32 of the 64 image voxels under latent voxel (1, 1, 0)
    plain, mirror = encode_cases(net, [TrainingCase(target=np.zeros((1, 16, 16, 16), np.float32), cond=cond,
                                                    weight=weight)], torch.device("cpu"))
    assert plain.weight.shape == plain.target.shape[1:] == (4, 4, 4)
    expected = np.ones((4, 4, 4), np.float32)
    expected[1, 1, 0] = 7.0
    assert np.array_equal(plain.weight, expected) and np.array_equal(mirror.weight, expected[..., ::-1])
    fraction = np.zeros((1, 4, 4, 4), np.float32)
    fraction[0, 1, 1, 0] = 0.5
    assert np.array_equal(plain.cond, fraction) and np.array_equal(mirror.cond, fraction[..., ::-1])


def test_bad_latent_settings_one_line_and_nothing_written(phantom_dir, tmp_path, capsys):
    for name, settings, message in [
            ("segment", {"autoencoder": {}}, "for whole-volume generation models only"),
            ("generate", {**SETTINGS, "autoencoder": {"network": {"channels": [16, 24]}}}, "must divide"),
            ("generate", {"task": {"from_labels": True}, "autoencoder": {}}, "for whole-volume generation")]:
        config = tmp_path / f"{name}.json"
        config.write_text(json.dumps(settings), encoding="utf-8")
        out = tmp_path / f"out-{name}"
        assert cli_main(["train", name, "--data", str(phantom_dir), "--out", str(out), "--config", str(config),
                         "--max-steps", "1", "--progress", "none"]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not out.exists()
    with pytest.raises(DiffusionMICError, match="must divide"):
        latent_spec({"network": {"norm_num_groups": 7}}, channels=1)
