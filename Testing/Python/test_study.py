"""`diffusion-mic study`: the runner (resume, bad input, report) and the denoising study."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from DiffusionMICLib.cli import main
from DiffusionMICLib.study import run_study
from DiffusionMICLib.study import denoise as denoise_study
from DiffusionMICLib.study.core import Context, user_data
from DiffusionMICLib.study.learners import DnCNN
from DiffusionMICLib.progress import Progress


@pytest.fixture(scope="module")
def quick_denoise(tmp_path_factory, one_thread) -> Path:
    out = tmp_path_factory.mktemp("study")
    run_study("denoise", out=out, quick=True, device="cpu")
    return out


def test_quick_denoise_study_has_every_method(quick_denoise):
    doc = json.loads((quick_denoise / "denoise.json").read_text(encoding="utf-8"))
    expected = {m.name for m in denoise_study.methods(quick=True)}
    assert set(doc["methods"]) == expected
    for name, result in doc["methods"].items():
        assert "phantom, 5 % noise" in result["tables"], name
        row = result["tables"]["phantom, 5 % noise"]
        assert np.isfinite(row["psnr"]) and 0 <= row["ssim"] <= 1
    assert doc["methods"]["noisy"]["tables"]["phantom, 5 % noise"]["psnr_gain"] == 0
    # a real trained model and a classic method change the image
    assert doc["methods"]["nlm"]["tables"]["phantom, 5 % noise"]["psnr_gain"] > 1.0
    assert doc["methods"]["unet"]["training"]["steps"] >= 1
    # adapted: the diffusion row's model, fine-tuned per scan in a temporary folder that is gone after
    assert doc["methods"]["diffusion-adapted"]["training"] == doc["methods"]["diffusion"]["training"]
    assert list(doc["methods"]["diffusion-adapted"]["tables"]) == ["phantom, 5 % noise", "real MR, 5 % noise"]
    assert not list((quick_denoise / "denoise" / "diffusion-adapted").glob("adapted-*"))
    md = (quick_denoise / "denoise.md").read_text(encoding="utf-8")
    assert md.count("| Noisy input |") == len(doc["methods"]["noisy"]["tables"])
    assert "**" in md and (quick_denoise / "denoise.png").stat().st_size > 10_000


def test_resumed_study_does_not_retrain(quick_denoise, monkeypatch):
    trained = quick_denoise / "denoise" / "unet" / "trained.json"
    before = trained.stat().st_mtime_ns
    data = json.loads((quick_denoise / "denoise.json").read_text(encoding="utf-8"))["data"]
    (quick_denoise / "denoise" / "unet" / "result.json").unlink()     # evaluation interrupted

    def no_training(*args, **kwargs):
        raise AssertionError("a finished method was trained again")
    monkeypatch.setattr("DiffusionMICLib.study.denoise.fit_supervised", no_training)
    monkeypatch.setattr("DiffusionMICLib.study.denoise.train", no_training)
    run_study("denoise", out=quick_denoise, quick=True, device="cpu", methods=["unet", "diffusion"])
    assert trained.stat().st_mtime_ns == before
    doc = json.loads((quick_denoise / "denoise.json").read_text(encoding="utf-8"))
    assert "nlm" in doc["methods"] and "unet" in doc["methods"]     # a partial rerun keeps the other rows
    assert doc["data"] == data                                         # and what the data set was


def test_report_merges(quick_denoise, capsys):
    assert main(["study", "report", str(quick_denoise)]) == 0
    report = (quick_denoise / "report.md").read_text(encoding="utf-8")
    assert report.startswith("# Does diffusion help? Measured here")
    assert "| denoise | phantom, 5 % noise | PSNR (dB) |" in report
    assert (quick_denoise / "report.png").is_file()


@pytest.mark.parametrize("argv, message", [
    (["study", "denoise", "--methods", "unet,magic"], "unknown denoise method(s) magic"),
    (["study", "report"], "needs the study's folder"),
])
def test_bad_study_input(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main(argv + (["--out", str(out)] if argv[1] != "report" else [])) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_unknown_study_task(capsys):
    with pytest.raises(SystemExit):
        main(["study", "nonsense"])
    assert "invalid choice" in capsys.readouterr().err


def test_data_set_without_the_channel(tmp_path, capsys):
    data = tmp_path / "ct"
    (data / "imagesTr").mkdir(parents=True)
    vol = np.zeros((4, 8, 8), np.float32)
    import SimpleITK as sitk
    for case in ("a", "b"):
        sitk.WriteImage(sitk.GetImageFromArray(vol), str(data / "imagesTr" / f"{case}_0000.nii.gz"))
    (data / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0},
                                                   "file_ending": ".nii.gz"}), encoding="utf-8")
    out = tmp_path / "out"
    assert main(["study", "denoise", "--data", str(data), "--out", str(out)]) == 2
    assert "needs channels T1" in capsys.readouterr().err
    assert not out.exists()


def test_user_data_split_is_fixed_and_disjoint(phantom_dir):
    a, b = user_data(phantom_dir), user_data(phantom_dir)
    assert [c.id for c in a.test] == [c.id for c in b.test] and a.train_ids == b.train_ids
    assert not set(a.train_ids) & {c.id for c in a.test} and len(a.test) == 1


@pytest.mark.parametrize("name", ["dncnn", pytest.param("unet", marks=pytest.mark.slow)])   # UNet regression: see test_study_translate
def test_denoising_baselines_learn(name, phantom_dir, heldout_dir, tmp_path, one_thread):
    """DnCNN (and the UNet regression), trained briefly on the study's own batches, beat the noisy input."""
    from DiffusionMICLib.study.core import Budget, StudyData
    from DiffusionMICLib.datasets import read_dataset
    train = read_dataset(phantom_dir)
    test = read_dataset(heldout_dir).cases
    budget = Budget(steps=300, batch_size=8, time_limit_s=240, train_subjects=3, test_subjects=1)
    ctx = Context(task="denoise", out=tmp_path, budget=budget, quick=True, device=torch.device("cpu"),
                  progress=Progress(),
                  data=StudyData("phantom", phantom_dir, train, [c.id for c in train.cases], test, {"kind": "test"}))
    method = next(m for m in denoise_study.methods(quick=True) if m.name == name)
    method.fit(ctx, tmp_path / name)
    result = method.evaluate(ctx, tmp_path / name)
    assert result.tables["phantom, 5 % noise"]["psnr_gain"] > 0.5, name     # untrained: about -10 dB


def test_training_set_with_real_mr(phantom_dir, tmp_path):
    """The phantom cases (linked, not copied) plus every real training image found, none of which is a
    test image; the folder reads as a data set and a second call changes nothing."""
    from DiffusionMICLib.datasets import read_dataset
    from DiffusionMICLib.study.realmr import real_mr, real_mr_training, training_set_with_real
    phantom = read_dataset(phantom_dir)
    ids = [c.id for c in phantom.cases[:2]]
    real_ids = training_set_with_real(phantom, ids, tmp_path / "mix")
    again = training_set_with_real(phantom, ids, tmp_path / "mix")
    mixed = read_dataset(tmp_path / "mix")
    assert real_ids == again and len(real_ids) == len(real_mr_training())
    assert sorted(c.id for c in mixed.cases) == sorted(ids + real_ids) and mixed.channels == phantom.channels
    assert (tmp_path / "mix" / "cleanTr" / f"{ids[0]}_0000.nii.gz").is_symlink()
    tests = [v.array for _, v in real_mr().values()]
    for _, volume in real_mr_training().values():
        assert not any(t.shape == volume.array.shape and np.allclose(t, volume.array) for t in tests)


def test_dncnn_is_residual():
    net = DnCNN(5, 1, depth=3, features=8, centre=2)
    torch.nn.init.zeros_(net.body[-1].conv.weight)
    x = torch.rand(2, 5, 16, 16)
    assert torch.equal(net(x), x[:, 2:3])


def test_markdown_escapes_a_pipe_in_a_label():
    """A label such as "FLAIR |z-score|" stays in its cell: every row has as many cells as the header."""
    from DiffusionMICLib.study.tables import markdown
    doc = {"task": "anomaly", "quick": True, "data": {"kind": "dataset", "path": "d", "split_seed": 0},
           "budget": {"steps": 1, "batch_size": 1, "time_limit_s": 1.0},
           "columns": [{"key": "auroc", "title": "AUROC", "better": "higher"}], "notes": [],
           "methods": {"z": {"label": "FLAIR |z-score|", "family": "floor", "note": "", "training": None,
                             "tables": {"phantom": {"auroc": 0.5}}, "seconds_per_volume": 0.1}}}
    rows = [line for line in markdown(doc).splitlines() if line.startswith("| ")]
    assert len(rows) == 2 and "FLAIR \\|z-score\\|" in rows[1]
    assert [len(r.replace("\\|", "").split("|")) for r in rows] == [len(rows[0].split("|"))] * 2
