"""The generation study: every method's row in a quick study, the VAE and the GAN learn, and a
data set without the generated channels gives one clear line and writes nothing."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from DiffusionMICLib.datasets import read_dataset
from DiffusionMICLib.errors import DiffusionMICError
from DiffusionMICLib.progress import Progress
from DiffusionMICLib.study import generate as study
from DiffusionMICLib.study import run_study
from DiffusionMICLib.study.core import Budget, Context, StudyData
from DiffusionMICLib.study.learners import load_baseline, network


@pytest.fixture(scope="module")
def tiny(phantom_dir: Path, heldout_dir: Path, tmp_path_factory, one_thread) -> Context:
    """Three phantom training subjects, one held-out subject; the quick 8 mm grid; 30 steps of batch 4."""
    train = read_dataset(phantom_dir)
    data = StudyData("phantom", phantom_dir, train, [c.id for c in train.cases], read_dataset(heldout_dir).cases, {})
    budget = Budget(steps=30, batch_size=4, time_limit_s=120, train_subjects=3, test_subjects=1)
    return Context("generate", tmp_path_factory.mktemp("generate-study"), data, budget, True,
                   torch.device("cpu"), Progress())


@pytest.mark.parametrize("kind, fit, steps", [("var-autoencoder", "_fit_vae", 100), ("generator", "_fit_gan", 60)])
def test_decoders_learn(tiny: Context, kind: str, fit: str, steps: int):
    """After 100 steps the VAE reconstructs the training volumes far better than untrained (its
    dense bottleneck learns slowly), and after 60 the GAN's decoded N(0, I) latents have their mean
    intensity (the untrained network's are far off); both run through the study's evaluation."""
    tiny = replace(tiny, budget=replace(tiny.budget, steps=steps))
    c = study.card(tiny)
    spec = study._vae_spec(tiny, c) if kind == "var-autoencoder" else study._gan_spec(tiny, c)
    torch.manual_seed(0)
    untrained = network(kind, **spec).eval()
    info = getattr(study, fit)(tiny, tiny.out / kind)
    assert info["steps"] == steps
    trained, _ = load_baseline(tiny.out / kind, tiny.device)
    x = torch.from_numpy(np.stack([tc.target for tc in study.training_cases(tiny, c)]))
    z = torch.randn(4, study._latent_size(tiny), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if kind == "var-autoencoder":
            errors = [float(((net.decode_forward(net.encode_forward(x)[0], use_sigmoid=False) - x) ** 2).mean())
                      for net in (trained, untrained)]
        else:
            errors = [abs(float(net(z).mean() - x.mean())) for net in (trained, untrained)]
            assert float(trained(z).abs().max()) <= 1.0           # tanh: inside the model's intensity range
    assert errors[0] < 0.7 * errors[1], errors
    evaluation = study._eval_decoder(tiny, tiny.out / kind)
    assert evaluation.tables["phantom: FLAIR"]["bright_tail_gap"] is not None
    assert set(evaluation.previews) >= {"T1 sample 1", "FLAIR sample 2", "T1 sample 1: error to nearest real"}


def test_data_without_flair_writes_nothing(tmp_path: Path):
    import SimpleITK as sitk
    data = tmp_path / "t1only"
    (data / "imagesTr").mkdir(parents=True)
    (data / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1"}, "labels": {"background": 0},
                                                   "numTraining": 2, "file_ending": ".nii.gz"}), encoding="utf-8")
    for case in ("a", "b"):
        sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(4, 8, 8).astype(np.float32)),
                        str(data / "imagesTr" / f"{case}_0000.nii.gz"))
    out = tmp_path / "study"
    with pytest.raises(DiffusionMICError, match="generate study needs channels T1, FLAIR.*lacks FLAIR"):
        run_study("generate", data=data, out=out, quick=True)
    assert not out.exists()


def test_quick_study_has_every_row(tmp_path_factory, one_thread):
    """`study generate --quick`: every method, one table per channel, the figure."""
    out = tmp_path_factory.mktemp("quick")
    written = run_study("generate", out=out, quick=True)
    doc = json.loads(Path(written["json"]).read_text(encoding="utf-8"))
    assert list(doc["methods"]) == [m.name for m in study.methods(True)]
    for name, result in doc["methods"].items():
        assert list(result["tables"]) == ["phantom: T1", "phantom: FLAIR"], name
        row = result["tables"]["phantom: FLAIR"]
        assert 0 <= row["nmae"] < 1 and row["psnr"] > 0 and row["fraction_error"] < 1
        assert row["bright_tail_gap"] is not None and row["sharpness"] > 0
        assert result["seconds_per_volume"] > 0
    assert doc["methods"]["diffusion"]["conditions"] == ["healthy", "lesion"]
    assert "nearest held-out real subject" in Path(written["markdown"]).read_text(encoding="utf-8")
    assert Path(written["figure"]).stat().st_size > 10_000


def test_latent_row_trains_both_stages_and_samples_on_its_grid(tiny: Context):
    """The latent diffusion row: the autoencoder and the UNet each get the budget's steps; its
    samples are scored like every row's."""
    from DiffusionMICLib.models import read_card
    from DiffusionMICLib.volume import Geometry
    info = study._fit_latent(tiny, tiny.out / "diffusion-latent")
    assert info["steps"] == tiny.budget.steps and info["autoencoder"]["steps"] == tiny.budget.steps
    assert info["wall_time_s"] > info["autoencoder"]["wall_time_s"] > 0
    card = read_card(tiny.out / "diffusion-latent" / "model")
    assert card.latent["scale_factor"] > 0 and Geometry.from_dict(card.grid).spacing == (8.0, 8.0, 8.0)
    evaluation = study._eval_latent(tiny, tiny.out / "diffusion-latent")
    row = evaluation.tables["phantom: FLAIR"]
    assert row["psnr"] > 0 and row["bright_tail_gap"] is not None and row["sharpness"] > 0
    trip = evaluation.extra["autoencoder_round_trip"]          # the held-out subjects through the autoencoder
    assert trip["T1"]["sharpness"]["ratio"] > 0 and len(trip["FLAIR"]["tissue_fractions"]["samples"]) == 3
    assert trip["FLAIR"]["bright_tail"]["round trip"] is not None
    # The v-prediction row reuses that autoencoder (not trained again) and trains only its UNet.
    v = study._fit_latent_v(tiny, tiny.out / "diffusion-latent-v")
    assert v["autoencoder"] == info["autoencoder"]
    ae = [(tiny.out / row / "model" / "autoencoder" / "autoencoder.safetensors").read_bytes()
          for row in ("diffusion-latent", "diffusion-latent-v")]
    assert ae[0] == ae[1]
    assert read_card(tiny.out / "diffusion-latent-v" / "model").schedule["prediction_type"] == "v_prediction"


def test_lesion_row_reuses_the_long_autoencoder(tiny: Context):
    """diffusion-latent-lesion needs the diffusion-latent-long row's autoencoder (one line, nothing
    trained, without it), then trains only its UNet over a copy of it, with the lesion weight."""
    from DiffusionMICLib.models import read_card
    tiny = replace(tiny, out=tiny.out / "lesion-row", budget=replace(tiny.budget, steps=4))
    with pytest.raises(DiffusionMICError, match="run that row first"):
        study._fit_latent_lesion(tiny, tiny.out / "diffusion-latent-lesion")
    assert not (tiny.out / "diffusion-latent-lesion" / "model" / "model.json").exists()
    long = study._fit_latent_long(tiny, tiny.out / "diffusion-latent-long")
    info = study._fit_latent_lesion(tiny, tiny.out / "diffusion-latent-lesion")
    assert info["autoencoder"] == long["autoencoder"] and info["steps"] == 4
    ae = [(tiny.out / row / "model" / "autoencoder" / "autoencoder.safetensors").read_bytes()
          for row in ("diffusion-latent-long", "diffusion-latent-lesion")]
    assert ae[0] == ae[1]
    assert read_card(tiny.out / "diffusion-latent-lesion" / "model").training["lesion_weight"] == study.LESION_WEIGHT
    # The long row continues that UNet's checkpoint to LONG_UNET times the steps.
    longer = study._fit_latent_lesion_long(tiny, tiny.out / "diffusion-latent-lesion-long")
    assert longer["steps"] == 4 * study.LONG_UNET and longer["autoencoder"] == long["autoencoder"]
    assert longer["wall_time_s"] - info["wall_time_s"] > 0        # the first 4 steps' time is carried over


def test_lesion_map_row_starts_from_the_long_lesion_unet(tiny: Context):
    """diffusion-latent-lesion-map needs the long autoencoder and the long lesion UNet (one line,
    nothing trained, without them); its UNet starts from that UNet with the map channel's weights
    at zero, over the long autoencoder continued with the lesion weight; its lesion samples draw
    the training subjects' maps."""
    from DiffusionMICLib.models import load_model, read_card
    tiny = replace(tiny, out=tiny.out / "map-row", budget=replace(tiny.budget, steps=4))
    with pytest.raises(DiffusionMICError, match="run those rows first"):
        study._fit_latent_lesion_map(tiny, tiny.out / "diffusion-latent-lesion-map")
    assert not (tiny.out / "diffusion-latent-lesion-map" / "model" / "model.json").exists()
    long = study._fit_latent_long(tiny, tiny.out / "diffusion-latent-long")
    study._fit_latent_lesion(tiny, tiny.out / "diffusion-latent-lesion")
    study._fit_latent_lesion_long(tiny, tiny.out / "diffusion-latent-lesion-long")
    info = study._fit_latent_lesion_map(tiny, tiny.out / "diffusion-latent-lesion-map")
    assert info["steps"] == 4 and info["autoencoder"]["steps"] == long["autoencoder"]["steps"] + 2
    card = read_card(tiny.out / "diffusion-latent-lesion-map" / "model")
    start = read_card(tiny.out / "diffusion-latent-lesion-long" / "model")
    assert card.training["init"] == {"model": start.name, "sha256": start.sha256}
    assert card.network["in_channels"] == start.network["in_channels"] + 1 and card.training["lesion_weight"] == 30
    assert card.training["lesion_maps"] and all(m["index"] for m in card.training["lesion_maps"])
    _, net = load_model(tiny.out / "diffusion-latent-lesion-map" / "model")
    _, old = load_model(tiny.out / "diffusion-latent-lesion-long" / "model")
    ae = [n.autoencoder.state_dict() for n in (net, old)]
    assert any(not torch.equal(v, ae[1][k]) for k, v in ae[0].items())     # the autoencoder was trained on
    evaluation = study._eval_latent(tiny, tiny.out / "diffusion-latent-lesion-map")
    assert evaluation.tables["phantom: FLAIR"]["bright_tail_gap"] is not None
