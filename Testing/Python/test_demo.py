"""The main job: `diffusion-mic demo` runs the six bundled models on a held-out phantom subject."""
import json

import numpy as np
import pytest

from DiffusionMICLib.cli import main as cli_main
from DiffusionMICLib.demo import BUNDLED
from DiffusionMICLib.models import load_model, read_catalog, resolve_model
from DiffusionMICLib.volume import read_volume

# The target; the bundled 2.5D residual denoiser reaches +7.30 dB on average over four held-out subjects
# (brain-mri-denoise-2d, the one for real scans, +5.81: not the demo's).
DENOISE_GAIN_DB = 6.0


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert cli_main(["demo", "--out", str(out), "--progress", "none", "--device", "cpu"]) == 0
    return out


def test_bundled_models_are_in_the_catalog_verified_and_small():
    names = {e["name"]: e["task"] for e in read_catalog()}
    assert set(BUNDLED.values()) <= set(names)
    total = 0
    for name, task in names.items():
        card, _ = load_model(name)      # SHA-256 checked
        assert card.name == name and card.task == task and card.training["steps"] > 0
        assert card.training["commit"] != "unknown" and "heldout" in card.metrics
        assert card.training["command"].startswith(("diffusion-mic train", "diffusion-mic study"))
        total += sum(f.stat().st_size for f in resolve_model(name).iterdir())
    assert total <= 40 * 2**20


def test_demo_writes_volumes_figures_and_metrics(demo_out, capsys):
    metrics = json.loads((demo_out / "metrics.json").read_text(encoding="utf-8"))
    assert set(BUNDLED) <= set(metrics) and metrics["subject"]["phantom_seed"] == 9001
    for task in BUNDLED:
        assert (demo_out / f"{task}.png").stat().st_size > 10_000
    assert (demo_out / "summary.png").stat().st_size > 10_000
    t1 = read_volume(demo_out / "subject-T1.nrrd")
    for name in ("T1-denoised", "T1-T2-to-FLAIR", "segmentation", "segmentation-uncertainty", "anomaly-map",
                 "anomaly-mask", "from-labels-T1", "from-labels-FLAIR"):
        vol = read_volume(demo_out / f"{name}.nrrd")
        assert vol.geometry.same_as(t1.geometry) and np.isfinite(vol.array).all()
    samples = [read_volume(p) for p in sorted(demo_out.glob("generated-*-T1.nrrd"))]
    assert len(samples) == 4 and samples[0].spacing == (2.0, 2.0, 2.0)


def test_bundled_models_reach_their_targets_on_the_demo_subject(demo_out):
    """The issue's targets on the held-out subject (generation: per-tissue means within 10 %, lesion
    samples at least half as bright-tailed as the real subject, healthy ones at most twice)."""
    m = json.loads((demo_out / "metrics.json").read_text(encoding="utf-8"))
    assert m["denoise"]["psnr_gain_db"] >= DENOISE_GAIN_DB
    assert m["translate"]["result"]["psnr"] >= 26 and m["translate"]["result"]["ssim"] >= 0.85
    dice = {name: v["dice"] for name, v in m["segment"]["labels"].items()}
    assert dice["lesion"] >= 0.70 and min(dice["CSF"], dice["GM"], dice["WM"]) >= 0.85
    assert m["anomaly"]["voxel_auroc"] >= 0.90
    for channel in m["generate"]["per_channel"].values():
        assert max(channel["tissue_mean_relative_error"]) <= 0.10
        assert channel["seed_difference"] > 0.02     # different seeds, visibly different samples
    tail = m["generate"]["per_channel"]["FLAIR"]["bright_tail"]     # lesions drawn (2.4 against 3.5 per mille real)
    assert tail["lesion samples"] >= 0.5 * tail["real lesion"] and tail["healthy samples"] <= 2 * tail["real healthy"]
    drawn = m["from-labels"]["segmenter"]["dice_drawn"]     # images drawn for the subject's own label map
    assert min(drawn[t] for t in ("CSF", "GM", "WM")) >= 0.85
    real = m["from-labels"]["segmenter"]["dice_real"]       # the segment task's result, reused
    assert real and all(real[t] == pytest.approx(dice[t]) for t in real)
