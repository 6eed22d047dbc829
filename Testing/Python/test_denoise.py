"""Denoising end to end: train -> save -> load -> run, geometry, determinism, CLI."""
import json
import subprocess
import sys

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

import DiffusionMICLib as dmic
from DiffusionMICLib.engine.pipeline import train
from DiffusionMICLib.volume import Geometry, Volume, read_volume, write_volume

from conftest import TINY_NETWORK


# x0-prediction with Fast-DDPM (training on the 4 timesteps a 4-step sampler visits) learns
# like regression: a couple of hundred steps already beat the noisy input.
SETTINGS = {"network": TINY_NETWORK, "patch": [48, 48],
            "schedule": {"prediction_type": "sample", "train_steps": 4}, "sampler": {"steps": 4},
            "train": {"batch_size": 8, "ema_start": 50, "lr": 1e-3, "seed": 0}}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, phantom_dir):
    """A tiny denoiser trained for 200 steps on three 5 %-noise phantom subjects."""
    out = tmp_path_factory.mktemp("models") / "tiny-denoise"
    train("denoise", phantom_dir, out, max_steps=200, settings=SETTINGS)
    return out


def test_trained_denoiser_lowers_rmse_on_heldout_subject(tiny_model, heldout_dir):
    noisy = read_volume(heldout_dir / "imagesTr" / "phantom_000_0000.nii.gz")
    clean = read_volume(heldout_dir / "cleanTr" / "phantom_000_0000.nii.gz")
    labels = read_volume(heldout_dir / "labelsTr" / "phantom_000.nii.gz")
    brain = labels.with_array((labels.array > 0).astype(np.uint8))
    result = dmic.denoise(noisy, tiny_model).outputs["output"]
    before = dmic.evaluate("denoise", noisy, clean, brain)
    after = dmic.evaluate("denoise", result, clean, brain)
    print(f"held-out T1 5 %: RMSE {before['rmse']:.2f} -> {after['rmse']:.2f}, PSNR {before['psnr']:.2f} -> {after['psnr']:.2f}")
    assert after["rmse"] < 0.95 * before["rmse"]


def oblique_reoriented(vol: Volume) -> Volume:
    """The same image with axes permuted/flipped, an oblique direction and anisotropic spacing."""
    arr = np.ascontiguousarray(np.flip(vol.array.transpose(1, 0, 2), axis=2))
    rot = Rotation.from_euler("xyz", [17, -9, 23], degrees=True).as_matrix() @ np.array([[0, 1, 0], [0, 0, -1], [-1, 0, 0]])
    geom = Geometry(size=arr.shape[::-1], spacing=(2.0, 2.4, 1.7), origin=(-31.5, 12.25, 80.0),
                    direction=tuple(rot.flatten()))
    return Volume(arr, geom)


def test_run_keeps_exact_geometry_of_oblique_input(tiny_model, phantom_dir, tmp_path):
    vol = oblique_reoriented(read_volume(phantom_dir / "imagesTr" / "phantom_000_0000.nii.gz"))
    src = write_volume(vol, tmp_path / "oblique.nrrd")
    out = dmic.denoise(read_volume(src), tiny_model, steps=2).outputs["output"]
    assert out.geometry.same_as(vol.geometry, tol=1e-9)
    assert out.array.shape == vol.array.shape and out.array.dtype == np.float32
    assert np.isfinite(out.array).all()


def test_same_seed_same_result_and_progress(tiny_model, phantom_dir):
    vol = read_volume(phantom_dir / "imagesTr" / "phantom_001_0001.nii.gz")
    vol = Volume.from_sitk(vol.to_sitk()[:, :, 20:36])      # 16 slices with their true geometry: fast
    seen = []
    a = dmic.denoise(vol, tiny_model, steps=2, seed=5, progress=lambda s, i, n: seen.append((i, n)))
    b = dmic.denoise(vol, tiny_model, steps=2, seed=5)
    c = dmic.denoise(vol, tiny_model, steps=2, seed=6)
    assert np.array_equal(a.outputs["output"].array, b.outputs["output"].array)
    assert not np.array_equal(a.outputs["output"].array, c.outputs["output"].array)
    assert seen[-1][0] == seen[-1][1] > 0


def test_cancel_stops_run(tiny_model, phantom_dir):
    vol = read_volume(phantom_dir / "imagesTr" / "phantom_001_0001.nii.gz")
    calls = []
    with pytest.raises(dmic.Cancelled):
        dmic.denoise(vol, tiny_model, steps=4, progress=lambda *a: calls.append(a), cancel=lambda: len(calls) >= 2)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "DiffusionMICLib", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_cli_run_json_progress_and_evaluate(tiny_model, phantom_dir, tmp_path, capsys):
    """`run` as a real process: JSON progress lines and a result line; then `evaluate` on its output."""
    out = tmp_path / "den.nii.gz"
    p = cli("run", "denoise", "--model", tiny_model, "--input", phantom_dir / "imagesTr" / "phantom_000_0002.nii.gz",
            "--output", out, "--steps", "2", "--progress", "json")
    assert p.returncode == 0, p.stderr
    lines = [json.loads(x) for x in p.stdout.strip().splitlines()]
    assert all({"stage", "step", "steps", "fraction"} <= set(x) for x in lines[:-1])
    assert lines[-2]["fraction"] == 1.0
    assert lines[-1]["outputs"]["output"] == str(out) and lines[-1]["steps"] == 2 and "wall_time_s" in lines[-1]
    from DiffusionMICLib.cli import main as cli_main
    assert cli_main(["evaluate", "denoise", "--pred", str(out), "--ref", str(phantom_dir / "cleanTr" / "phantom_000_0002.nii.gz"),
                     "--mask", str(phantom_dir / "labelsTr" / "phantom_000.nii.gz")]) == 0
    assert {"rmse", "psnr", "ssim"} <= set(json.loads(capsys.readouterr().out))


def _write_bad(kind: str, path):
    import SimpleITK as sitk
    if kind == "4d":
        sitk.WriteImage(sitk.Image([4, 4, 4, 3], sitk.sitkFloat32), str(path))
    elif kind == "vector":
        sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkVectorFloat32, 3), str(path))
    elif kind == "nan":
        a = np.zeros((4, 4, 4), np.float32)
        a[1, 1, 1] = np.nan
        sitk.WriteImage(sitk.GetImageFromArray(a), str(path))
    elif kind == "text":
        path.write_text("not an image", encoding="utf-8")
    elif kind == "empty":
        path.write_bytes(b"")


@pytest.mark.parametrize("kind", ["4d", "vector", "nan", "text", "empty", "missing"])
def test_bad_input_clear_error_no_output(kind, tiny_model, tmp_path, capsys):
    """In this process (test_bad_model_and_options runs one bad case as a real process)."""
    from DiffusionMICLib.cli import main as cli_main
    # SimpleITK's NIfTI writer turns NaN into 0, so the NaN case is written as MetaImage
    bad = tmp_path / f"bad-{kind}{'.mha' if kind == 'nan' else '.nii.gz'}"
    _write_bad(kind, bad)
    out = tmp_path / "out.nrrd"
    assert cli_main(["run", "denoise", "--model", str(tiny_model), "--input", str(bad), "--output", str(out),
                     "--steps", "1", "--progress", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and bad.name in err[0], err
    assert not out.exists() and not list(tmp_path.glob(".tmp*"))


def test_bad_model_and_options(tiny_model, phantom_dir, tmp_path, capsys):
    """One line on stderr, exit 2, nothing written (in this process; the first case as a real process too)."""
    from DiffusionMICLib.cli import main as cli_main
    src = phantom_dir / "imagesTr" / "phantom_000_0000.nii.gz"
    out = tmp_path / "o.nrrd"
    p = cli("run", "denoise", "--model", tmp_path / "nope", "--input", src, "--output", out, "--progress", "none")
    assert p.returncode == 2 and "nope" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    for args, needle in [(["--model", tiny_model, "--steps", "0"], "steps"),
                         (["--model", tiny_model, "--strength", "1.5"], "strength"),
                         (["--model", tiny_model, "--device", "cuda:7"], "cuda")]:
        code = cli_main(["run", "denoise", *map(str, args), "--input", str(src), "--output", str(out), "--progress", "none"])
        err = capsys.readouterr().err
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_cli_output_may_not_overwrite_input(tiny_model, phantom_dir, tmp_path, capsys):
    from DiffusionMICLib.cli import main as cli_main
    src = write_volume(read_volume(phantom_dir / "imagesTr" / "phantom_000_0000.nii.gz"), tmp_path / "in.nrrd")
    before = src.read_bytes()
    assert cli_main(["run", "denoise", "--model", str(tiny_model), "--input", str(src), "--output", str(src),
                     "--progress", "none"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1 and src.read_bytes() == before


def test_models_evaluate_writes_heldout_metrics_into_the_card(tiny_model, heldout_dir, tmp_path, capsys):
    import shutil
    from DiffusionMICLib.cli import main as cli_main
    from DiffusionMICLib.models import load_model
    model = shutil.copytree(tiny_model, tmp_path / "model", ignore=shutil.ignore_patterns("checkpoint"))
    assert cli_main(["models", "evaluate", str(model), "--data", str(heldout_dir), "--write", "--progress", "none"]) == 0
    printed = json.loads(capsys.readouterr().out)
    card, _ = load_model(model)     # the weights' hash still matches
    stored = card.metrics["heldout"]
    assert stored == printed and stored["cases"] == ["phantom_000"] and stored["phantom_seed"] == 1234
    assert stored["mean"]["psnr_gain_db"] == pytest.approx(stored["per_case"][0]["result"]["psnr"]
                                                          - stored["per_case"][0]["input"]["psnr"])
    assert cli_main(["models", "evaluate", str(model), "--progress", "none"]) == 2   # no --data: one-line error


def test_noise_range_matches_the_phantoms_percent_of_brightest_tissue(phantom_dir):
    """Synthetic training noise at 5 % has about the noise of the phantom's 5 % images (same units)."""
    from DiffusionMICLib.datasets import read_dataset
    from DiffusionMICLib.engine.batches import random_batches
    from DiffusionMICLib.tasks import get_task
    task, ds = get_task("denoise"), read_dataset(phantom_dir)
    card = task.make_card(ds, {"task": {"noise_range": [5, 5], "channels": ["T1"]}})
    (case,) = task.training_cases(card, ds, ds.cases[:1])
    np.testing.assert_array_equal(case.cond, case.target)      # clean until augment() adds the noise
    batch = next(random_batches([case], spatial_dims=2, patch=[64, 64], batch_size=32, seed=0,
                                augment=task.augment(card)))
    inside = batch.target > -0.2    # brain and scalp, away from the Rician floor of the background
    synthetic = float(((batch.cond - batch.target)[inside]).std()) / 2
    acquired = task.make_card(ds, {"task": {"channels": ["T1"]}})
    (real,) = task.training_cases(acquired, ds, ds.cases[:1])
    inside = real.target > -0.2
    measured = float(np.std((real.cond - real.target)[inside])) / 2
    print(f"noise sigma (unit scale): synthetic 5 % {synthetic:.4f}, phantom 5 % {measured:.4f}")
    assert 0.75 < synthetic / measured < 1.33


@pytest.fixture(scope="module")
def noisier_site(tmp_path_factory):
    """A 'site' whose scans are noisier (12 %) than the base model's training data (5 %)."""
    from DiffusionMICLib.phantom import write_phantom
    out = tmp_path_factory.mktemp("site")
    write_phantom(out, subjects=2, seed=77, resolution=2.0, noise=12.0, lesions=1)
    return out


def site_psnr(site, model) -> float:
    """PSNR in the brain of the model's result on the site's held-out T1 scan (phantom_001). One
    sampler step: these x0 models give the same image at 1 and 4 steps (the speed study: within
    0.1 dB), and the comparisons below are between models at the same step count."""
    noisy = read_volume(site / "imagesTr" / "phantom_001_0000.nii.gz")
    clean = read_volume(site / "cleanTr" / "phantom_001_0000.nii.gz")
    labels = read_volume(site / "labelsTr" / "phantom_001.nii.gz")
    brain = labels.with_array((labels.array > 0).astype(np.uint8))
    return dmic.evaluate("denoise", dmic.denoise(noisy, model, steps=1).outputs["output"], clean, brain)["psnr"]


@pytest.fixture(scope="module")
def base_site_psnr(tiny_model, noisier_site) -> float:
    return site_psnr(noisier_site, tiny_model)


def test_lora_finetune_adapts_to_a_noisier_site_and_leaves_the_base(tiny_model, noisier_site, base_site_psnr, tmp_path,
                                                                    capsys):
    from DiffusionMICLib.cli import main as cli_main
    from DiffusionMICLib.models import load_model
    base_weights = (tiny_model / "model.safetensors").read_bytes()
    config = tmp_path / "finetune.json"
    config.write_text(json.dumps({"cases": ["phantom_000"]}), encoding="utf-8")     # phantom_001 is the site's held-out scan
    out = tmp_path / "tuned"
    assert cli_main(["finetune", "denoise", "--model", str(tiny_model), "--data", str(noisier_site), "--out", str(out),
                     "--lora-rank", "4", "--max-steps", "120", "--config", str(config), "--progress", "none"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["lora_rank"] == 4 and printed["steps"] == 120
    base, _ = load_model(tiny_model)
    card, network = load_model(out)             # a plain network: the adapters are merged
    tuned = card.training["finetune"]
    assert tuned["base_model"] == base.name and tuned["base_sha256"] == base.sha256 and card.name == f"{base.name}-finetuned"
    assert 0 < tuned["trainable_parameters"] < 0.3 * tuned["parameters"]
    assert card.network == base.network and not any("lora" in k for k in network.state_dict())
    assert (tiny_model / "model.safetensors").read_bytes() == base_weights
    tuned_psnr = site_psnr(noisier_site, out)
    print(f"site 12 % noise, held-out scan: PSNR base {base_site_psnr:.2f} -> fine-tuned {tuned_psnr:.2f}")
    assert tuned_psnr > base_site_psnr + 0.5


ADAPT_STEPS = 100


def test_adapt_to_one_noisy_scan_without_its_clean_version(tiny_model, noisier_site, base_site_psnr, tmp_path, capsys):
    """Recorrupted-to-Recorrupted on the 12 % scan alone (its clean version is only used to score):
    better than the 5 %-trained base on that scan; the base is left as it was."""
    from DiffusionMICLib.cli import main as cli_main
    from DiffusionMICLib.models import load_model
    base_weights = (tiny_model / "model.safetensors").read_bytes()
    scan = noisier_site / "imagesTr" / "phantom_001_0000.nii.gz"
    out = tmp_path / "adapted"
    assert cli_main(["adapt", "denoise", "--model", str(tiny_model), "--input", str(scan), "--out", str(out),
                     "--steps", str(ADAPT_STEPS), "--lora-rank", "4", "--progress", "none"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["steps"] == ADAPT_STEPS and printed["sigma_estimated"] is True
    card, _ = load_model(out)
    assert card.training["self_supervised"]["method"] == "recorrupted-to-recorrupted"
    assert card.training["data"] == str(scan) and card.training["finetune"]["base_model"] == load_model(tiny_model)[0].name
    assert (tiny_model / "model.safetensors").read_bytes() == base_weights
    adapted_psnr = site_psnr(noisier_site, out)
    print(f"12 % scan, self-supervised: PSNR base {base_site_psnr:.2f} -> adapted {adapted_psnr:.2f}")
    assert adapted_psnr > base_site_psnr + 0.3


def test_run_adapt_option_and_bad_input(tiny_model, noisier_site, tmp_path, capsys):
    from DiffusionMICLib.cli import main as cli_main
    scan = str(noisier_site / "imagesTr" / "phantom_001_0000.nii.gz")
    out = tmp_path / "denoised.nii.gz"
    assert cli_main(["run", "denoise", "--model", str(tiny_model), "--input", scan, "--output", str(out),
                     "--adapt", "3", "--steps", "1", "--progress", "none"]) == 0
    assert json.loads(capsys.readouterr().out)["adapted"]["steps"] == 3 and out.is_file()
    with pytest.raises(SystemExit):                     # argparse: denoise is the only choice
        cli_main(["adapt", "segment", "--model", str(tiny_model), "--input", scan, "--out", str(tmp_path / "bad")])
    capsys.readouterr()
    for extra, message in ((["--steps", "0"], "steps"), (["--sigma", "-1"], "sigma"),
                           (["--input", str(tmp_path / "none.nii.gz")], "none.nii.gz")):
        argv = ["adapt", "denoise", "--model", str(tiny_model), "--input", scan, "--out", str(tmp_path / "bad"),
                "--progress", "none"] + extra
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
    assert cli_main(["adapt", "denoise", "--model", str(tiny_model), "--input", scan, "--out", str(tiny_model),
                     "--progress", "none"]) == 2
    assert "base model's own folder" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--lora-rank", "-1"], "LoRA rank"),
    (["--out", "{model}"], "base model's own folder"),
])
def test_finetune_refuses_bad_options(tiny_model, noisier_site, tmp_path, capsys, args, message):
    from DiffusionMICLib.cli import main as cli_main
    argv = ["finetune", "denoise", "--model", str(tiny_model), "--data", str(noisier_site), "--out", str(tmp_path / "x"),
            "--progress", "none"] + [a.format(model=tiny_model) for a in args]
    assert cli_main(argv) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert cli_main(["finetune", "segment", "--model", str(tiny_model), "--data", str(noisier_site),
                     "--out", str(tmp_path / "y"), "--progress", "none"]) == 2
    assert "not a segment model" in capsys.readouterr().err


def test_context_slices_stack_neighbours_and_train_a_2p5d_denoiser(phantom_dir, heldout_dir, tmp_path):
    """"context": 1 gives the 2D model the slices above and below: shapes, edges, and a run whose
    output keeps the input's grid."""
    from DiffusionMICLib.engine.inference import stack_neighbours
    from DiffusionMICLib.errors import DiffusionMICError
    from DiffusionMICLib.models import ModelCard
    a = np.arange(2 * 4 * 1 * 1, dtype=np.float32).reshape(2, 4, 1, 1)
    s = stack_neighbours(a, 1)
    assert s.shape == (6, 4, 1, 1)
    np.testing.assert_array_equal(s[:3, :, 0, 0], [[0, 0, 1, 2], [0, 1, 2, 3], [1, 2, 3, 3]])   # channel 0: z-1, z, z+1
    np.testing.assert_array_equal(s[4], a[1])
    card = train("denoise", phantom_dir, tmp_path / "m", max_steps=30,
                 settings={**SETTINGS, "context": 1, "task": {"noise_range": [3, 7], "channels": ["T1"]}})
    assert card.context == 1 and card.network["in_channels"] == 4
    noisy = read_volume(heldout_dir / "imagesTr" / "phantom_000_0000.nii.gz")
    out = dmic.denoise(noisy, tmp_path / "m").outputs["output"]
    assert out.geometry.same_as(noisy.geometry, tol=1e-9) and np.isfinite(out.array).all()
    with pytest.raises(DiffusionMICError, match="context"):
        ModelCard.from_dict({**card.to_dict(), "network": {**card.network, "spatial_dims": 3}})


class EchoLevel:
    """A stand-in x0 predictor that returns its first noise-map channel (the level it was told)."""

    def __init__(self, index: int):
        self.index = index

    def __call__(self, x, t, class_labels=None):
        return x[:, self.index:self.index + 1]

    def eval(self):
        return self


def test_noise_map_conditions_on_the_given_or_estimated_level(phantom_dir):
    """{"task": {"noise_map": true}}: training crops carry a map of their drawn level (FFDNet-style),
    stacked like the noisy slices; a run passes --sigma, or the input's estimated level, the same way."""
    import torch
    from DiffusionMICLib.datasets import read_dataset
    from DiffusionMICLib.engine.space import robust_scale
    from DiffusionMICLib.engine.trainer import Batch
    from DiffusionMICLib.errors import DiffusionMICError
    from DiffusionMICLib.progress import Progress
    from DiffusionMICLib.tasks import RunOptions, get_task
    task, ds = get_task("denoise"), read_dataset(phantom_dir)
    card = task.make_card(ds, {**SETTINGS, "context": 1, "task": {"noise_range": [1, 9], "noise_map": True}})
    assert card.network["in_channels"] == 1 + 3 * 2
    clean = torch.rand(4, 3, 24, 24) * 0.5
    batch = task.augment(card)(Batch(clean[:, 1:2], clean), torch.Generator().manual_seed(0))
    levels = batch.cond[:, 3:]
    assert batch.cond.shape == (4, 6, 24, 24) and (levels == levels[:, :1, :1, :1]).all()
    noise = (batch.cond[:, :3] - clean).std(dim=(1, 2, 3))     # Rician ~ Gaussian at these levels
    np.testing.assert_allclose(noise.numpy(), levels[:, 0, 0, 0].numpy(), rtol=0.2)
    vol = read_volume(phantom_dir / "imagesTr" / "phantom_000_0000.nii.gz")
    vol = Volume.from_sitk(vol.to_sitk()[:, :, 20:24])
    scale = robust_scale(vol.array, card.normalisation)
    options = RunOptions(sampler="ddim", steps=1, sigma=7.5).with_card_defaults(card)
    res = task.run(card, EchoLevel(1 + 3), [vol], options, Progress(), torch.device("cpu"))
    inside = res.outputs["output"].array[res.outputs["output"].array != 0]
    np.testing.assert_allclose(inside, 7.5 + scale / 2, rtol=1e-4)       # from_unit(2 sigma / scale)
    assert res.info["sigma"]["value"] == 7.5 and not res.info["sigma"]["estimated"]
    estimated = task.run(card, EchoLevel(4), [vol], RunOptions(sampler="ddim", steps=1).with_card_defaults(card),
                         Progress(), torch.device("cpu"))
    assert estimated.info["sigma"]["estimated"] and 2 < estimated.info["sigma"]["percent_of_median"] < 10
    with pytest.raises(DiffusionMICError, match="noise_range"):
        task.make_card(ds, {"task": {"noise_map": True}})
    with pytest.raises(DiffusionMICError, match="--sigma"):
        RunOptions(sigma=0).validate()


def test_residual_network_predicts_the_correction_to_the_noisy_slice(phantom_dir):
    """{"task": {"residual": true}}: the x0 prediction is the network's output plus the noisy centre
    slice (input channel 1 + context); untrained (MONAI zeroes the output layer) it returns that
    slice, with whatever intensities, and after a weight change the plain UNet's output plus it.
    Refused for a model that does not predict x0."""
    import torch
    from DiffusionMICLib.datasets import read_dataset
    from DiffusionMICLib.engine.network import build_network
    from DiffusionMICLib.errors import DiffusionMICError
    from DiffusionMICLib.tasks import get_task
    task, ds = get_task("denoise"), read_dataset(phantom_dir)
    card = task.make_card(ds, {**SETTINGS, "context": 1, "task": {"noise_range": [1, 9], "residual": True}})
    assert card.network["residual_input"] == 2
    net = build_network(card.network).eval()
    x = torch.randn(2, 4, 16, 16) * 3.0           # x_t, then the noisy slices z-1, z, z+1
    t = torch.tensor([10, 500])
    assert torch.equal(net(x, t), x[:, 2:3])
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    plain = build_network({k: v for k, v in card.network.items() if k != "residual_input"}).eval()
    plain.load_state_dict(net.state_dict())        # the same state dict keys
    assert torch.allclose(net(x, t), plain(x, t) + x[:, 2:3], atol=1e-5)
    with pytest.raises(DiffusionMICError, match="residual needs prediction_type 'sample'"):
        task.make_card(ds, {"task": {"residual": True}, "schedule": {"prediction_type": "epsilon"}})


def test_gamma_and_texture_change_conditioning_and_target_alike(phantom_dir):
    """{"task": {"gamma": ..., "texture": ...}}: the clean crop is remapped (median kept) and given
    fine structure shared by its stacked neighbours, before the noise; the target gets the same."""
    import torch
    from DiffusionMICLib.datasets import read_dataset
    from DiffusionMICLib.engine.trainer import Batch
    from DiffusionMICLib.errors import DiffusionMICError
    from DiffusionMICLib.tasks import get_task
    task, ds = get_task("denoise"), read_dataset(phantom_dir)
    clean = 0.2 + torch.rand(4, 3, 24, 24) * 0.6            # [0, 1] units, 2.5D: three stacked slices
    batch = Batch(clean[:, 1:2] * 2 - 1, clean * 2 - 1)
    card = task.make_card(ds, {**SETTINGS, "context": 1, "task": {"noise_range": [0, 0], "gamma": [2, 2]}})
    out = task.augment(card)(batch, torch.Generator().manual_seed(0))
    expected = 0.5 * (clean / 0.5) ** 2
    np.testing.assert_allclose((out.cond + 1).numpy() / 2, expected.numpy(), rtol=1e-4, atol=1e-5)   # no noise at 0 %
    np.testing.assert_allclose(out.target.numpy(), out.cond[:, 1:2].numpy(), atol=1e-5)
    card = task.make_card(ds, {**SETTINGS, "context": 1, "task": {"noise_range": [0, 0], "texture": 0.2}})
    out = task.augment(card)(batch, torch.Generator().manual_seed(0))
    gain = (out.cond + 1) / 2 / clean
    assert float((gain - 1).abs().max()) > 0.01                                         # structure added
    np.testing.assert_allclose(gain[:, 0].numpy(), gain[:, 2].numpy(), rtol=1e-4)       # shared by the neighbours
    np.testing.assert_allclose(out.target.numpy(), out.cond[:, 1:2].numpy(), atol=1e-5)
    with pytest.raises(DiffusionMICError, match="gamma needs noise_range"):
        task.make_card(ds, {"task": {"gamma": [0.5, 2]}})


def test_acquired_orientation_run_returns_the_input_on_its_grid(phantom_dir):
    """{"orientation": "acquired"} on a coronal scan of thick slices (the plane itself:
    test_volume's acquired-slices test): an untrained residual model (MONAI zeroes the output layer)
    returns its input, on the input's grid, through the permuted model space and back."""
    from DiffusionMICLib.datasets import read_dataset
    from DiffusionMICLib.engine.network import build_network
    from DiffusionMICLib.tasks import RunOptions, get_task
    from DiffusionMICLib.progress import Progress
    import torch
    task, ds = get_task("denoise"), read_dataset(phantom_dir)
    card = task.make_card(ds, {**SETTINGS, "context": 1, "orientation": "acquired",
                               "task": {"noise_range": [1, 9], "residual": True}})
    assert card.orientation == "acquired"
    card.normalisation = {"method": "percentile", "percentile": 50, "value": 0.5}
    t1 = read_volume(phantom_dir / "imagesTr" / "phantom_000_0000.nii.gz")
    coronal = Volume(np.ascontiguousarray(t1.array[:, ::2].transpose(1, 0, 2)),       # 4 mm coronal slices first
                     Geometry((t1.array.shape[2], t1.array.shape[0], t1.array.shape[1] // 2), (2.0, 2.0, 4.0),
                              (0.0, 0.0, 0.0), (1, 0, 0, 0, 0, 1, 0, -1, 0)))
    net = build_network(card.network).eval()
    options = RunOptions(device="cpu", steps=2).with_card_defaults(card)
    with torch.inference_mode():
        out = task.run(card, net, [coronal], options, Progress(), torch.device("cpu")).outputs["output"]
    assert out.geometry.same_as(coronal.geometry, tol=1e-9)
    inside = out.array != 0                     # the run's foreground box (0 outside it)
    assert inside.mean() > 0.3
    np.testing.assert_allclose(out.array[inside], coronal.array[inside], atol=1e-2 * float(coronal.array.max()))
