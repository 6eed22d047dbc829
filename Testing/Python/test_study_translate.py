"""The modality-conversion study: every method's row in a quick study, each baseline family
learns on a tiny problem, and bad input gives one clear line and writes nothing."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from DiffusionMICLib.errors import DiffusionMICError
from DiffusionMICLib.progress import Progress
from DiffusionMICLib.study import run_study
from DiffusionMICLib.study import translate as study
from DiffusionMICLib.study.core import Budget, Context, StudyData
from DiffusionMICLib.datasets import read_dataset
from DiffusionMICLib.study.learners import network
from DiffusionMICLib.tasks import get_task

DIRECTION = (("T1", "T2"), "FLAIR")


@pytest.fixture(scope="module")
def tiny(phantom_dir: Path, heldout_dir: Path, tmp_path_factory, one_thread) -> Context:
    """Three phantom training subjects, one held-out subject cut to a slab; 40 steps of batch 8."""
    train = read_dataset(phantom_dir)
    data = StudyData("phantom", phantom_dir, train, [c.id for c in train.cases], read_dataset(heldout_dir).cases, {})
    budget = Budget(steps=40, batch_size=8, time_limit_s=3 * 120, train_subjects=3, test_subjects=1)
    return Context("translate", tmp_path_factory.mktemp("translate-study"), data, budget, True,
                   torch.device("cpu"), Progress())


def _score(ctx: Context, folder: Path) -> float:
    """PSNR of a trained baseline on the held-out slab, T1 + T2 -> FLAIR, through the task's pipeline."""
    evaluation = study._evaluate(ctx, study.baseline_converter(ctx, lambda i, o: folder), directions=(DIRECTION,))
    return evaluation.tables[study.table(ctx, *DIRECTION)]["psnr"]


@pytest.fixture(scope="module")
def copy_t1(tiny: Context) -> float:
    """The trivial floor: the T1 input itself as the FLAIR."""
    item = next(i for i in study.test_items(tiny) if (i["inputs"], i["output"]) == DIRECTION)
    return get_task("translate").evaluate(item["volumes"][0], item["reference"], item["mask"])["psnr"]


@pytest.mark.parametrize("fit", ["_fit_polynomial", "_fit_unet", pytest.param("_fit_attention", marks=pytest.mark.slow),
                                 "_fit_pix2pix"])   # the attention UNet: the UNet family, run with -m slow
def test_paired_baselines_learn(tiny: Context, copy_t1: float, fit: str):
    folder = tiny.out / fit
    getattr(study, fit)(tiny, folder, *DIRECTION)
    assert (folder / "weights.safetensors").is_file() and (folder / "baseline.json").is_file()
    psnr = _score(tiny, folder)
    assert psnr > copy_t1 + 0.5, f"{fit}: {psnr:.2f} dB, copying T1 {copy_t1:.2f} dB"


@pytest.mark.slow     # the adversarial family is tested by pix2pix in the default suite
def test_cyclegan_learns_unpaired(tiny: Context):
    """CycleGAN sees inputs and targets of different subjects; after 40 steps its cycle A -> B -> A
    returns the inputs far better than its untrained self (which returns zeros)."""
    from DiffusionMICLib.study.learners import load_baseline, train_config, training_batches
    c = study.card(tiny, *DIRECTION)
    info = study._fit_cyclegan(tiny, tiny.out / "cyclegan", *DIRECTION)
    assert info["steps"] == 40
    pair, _ = load_baseline(tiny.out / "cyclegan", tiny.device)
    untrained = network("cyclegan", forward=study._unet(c, 2, 1), backward=study._unet(c, 1, 2)).eval()
    batch = next(training_batches(c, study.training_cases(tiny, c), train_config(tiny.budget, seed=5), unpaired=True))
    with torch.no_grad():
        errors = [float((p.ba(p.ab(batch.cond)) - batch.cond).abs().mean()) for p in (pair, untrained)]
    assert errors[0] < 0.5 * errors[1], errors


def test_unpaired_batches_mix_subjects(tiny: Context):
    from DiffusionMICLib.study.learners import train_config, training_batches
    c = study.card(tiny, *DIRECTION)
    cases = study.training_cases(tiny, c)
    batch = next(training_batches(c, cases, train_config(tiny.budget), unpaired=True))
    assert batch.cond.shape[1] == 2 and batch.target.shape[1] == 1
    with pytest.raises(DiffusionMICError, match="two training subjects"):
        training_batches(c, cases[:1], train_config(tiny.budget), unpaired=True)


def test_unknown_method_writes_nothing(tmp_path: Path):
    out = tmp_path / "study"
    with pytest.raises(DiffusionMICError, match="unknown translate method.*pix2pix"):
        run_study("translate", out=out, quick=True, methods=["pix2pix", "gan"])
    assert not out.exists()


def test_data_without_the_channels_writes_nothing(tmp_path: Path):
    """A data set of T1 and T2 only cannot hold the FLAIR directions."""
    import SimpleITK as sitk
    data = tmp_path / "t1t2"
    (data / "imagesTr").mkdir(parents=True)
    (data / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0},
                                                   "numTraining": 2, "file_ending": ".nii.gz"}), encoding="utf-8")
    for case in ("a", "b"):
        for ch in range(2):
            sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(4, 8, 8).astype(np.float32)),
                            str(data / "imagesTr" / f"{case}_{ch:04d}.nii.gz"))
    out = tmp_path / "study"
    with pytest.raises(DiffusionMICError, match="needs channels T1, T2, FLAIR.*lacks FLAIR"):
        run_study("translate", data=data, out=out, quick=True)
    assert not out.exists()


def test_quick_study_has_every_row(tmp_path_factory):
    """`study translate --quick`: every method in every direction (the bundled model in its own), JSON, MD, PNG."""
    out = tmp_path_factory.mktemp("quick")
    written = run_study("translate", out=out, quick=True)
    doc = json.loads(Path(written["json"]).read_text(encoding="utf-8"))
    names = [m.name for m in study.methods(True)]
    assert list(doc["methods"]) == names
    tables = [f"phantom: {', '.join(i)} → {o}" for i, o in study.DIRECTIONS]
    for name, result in doc["methods"].items():
        expected = tables[:1] if name == "diffusion-bundled" else tables
        assert list(result["tables"]) == expected, name
        for row in result["tables"].values():
            assert 0 < row["psnr"] < 60 and 0 <= row["nmae"] < 1 and -1 <= row["ssim"] <= 1
    text = Path(written["markdown"]).read_text(encoding="utf-8")
    assert all(f"## {t}" in text for t in tables)
    assert Path(written["figure"]).stat().st_size > 10_000
