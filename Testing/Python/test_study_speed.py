"""`diffusion-mic study speed`: DiffusionMIC's recipe and samplers against MONAI's DDPM-1000 path."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from DiffusionMICLib.datasets import read_dataset
from DiffusionMICLib.engine.network import build_network
from DiffusionMICLib.engine.schedule import NoiseSchedule
from DiffusionMICLib.errors import DiffusionMICError
from DiffusionMICLib.study import run_study
from DiffusionMICLib.study import speed
from DiffusionMICLib.study.learners import train_config, training_batches
from DiffusionMICLib.study.core import Budget, QUICK
from DiffusionMICLib.tasks import get_task
from DiffusionMICLib.cli import main


def test_monai_recipe_learns_epsilon(phantom_dir: Path, one_thread):
    """MONAI's training step (DiffusionInferer, epsilon over 1000 steps) in the engine's trainer:
    the loss falls from 1 (MONAI zero-initialises the output) within 40 steps."""
    from DiffusionMICLib.study.core import Context, StudyData
    from DiffusionMICLib.progress import Progress
    train = read_dataset(phantom_dir)
    ctx = Context("speed", phantom_dir, StudyData("phantom", phantom_dir, train, [c.id for c in train.cases], [], {}),
                  Budget(40, 8, 120, 3, 0), True, torch.device("cpu"), Progress())
    card = get_task("translate").make_card(train, speed.settings(ctx, "translate", "monai"))
    assert card.noise_schedule == NoiseSchedule(prediction_type="epsilon", train_steps=None)
    cases = get_task("translate").training_cases(card, train, train.cases[:2])
    config = train_config(ctx.budget)
    trainer = speed.MonaiRecipeTrainer(build_network(card.network), card.noise_schedule, config, ctx.device)
    losses = trainer.fit(training_batches(card, cases, config))
    assert len(losses) == 40
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:3]), losses


def test_peer_path_is_monai_ddpm():
    """The peer path runs all 1000 MONAI DDPM steps on the network it wraps."""
    calls = []

    class Count(torch.nn.Module):
        def forward(self, x, timesteps, context=None):
            calls.append(float(timesteps[0]))
            return torch.zeros_like(x[:, :1])

    out = speed.MonaiPath(Count(), out_channels=1)(torch.zeros(2, 3, 8, 8), torch.tensor(999))
    assert out.shape == (2, 1, 8, 8) and len(calls) == 1000 and calls[0] == 999 and calls[-1] == 0
    assert out.abs().max() <= 1.0    # MONAI's default clips the x0 estimate (epsilon 0: x_t / sqrt(alpha) otherwise)


@pytest.mark.slow
def test_headline_rows(tmp_path: Path, one_thread):
    """The MONAI path and DiffusionMIC's default on denoising, in one run: speed-up measured."""
    names = ["denoise-monai-ddpm-1000", "denoise-dmic-dpm++2m-4"]
    written = run_study("speed", out=tmp_path, quick=True, methods=names)
    doc = json.loads(Path(written["json"]).read_text(encoding="utf-8"))
    table = speed.headline_table("denoise")
    peer, ours = (doc["methods"][n] for n in names)
    assert peer["tables"][table]["speedup"] == 1.0 and peer["family"] == "peer"
    assert ours["tables"][table]["speedup"] > 5, ours
    assert ours["volume_slices"] > ours["slab_slices"] == speed.SLAB[True]
    assert f"## {table}" in Path(written["markdown"]).read_text(encoding="utf-8")


def test_speed_is_a_study_choice_and_checks_methods(tmp_path: Path, capsys):
    with pytest.raises(DiffusionMICError, match="unknown speed method"):
        run_study("speed", out=tmp_path / "x", methods=["denoise-monai-ddpm-999"])
    assert not (tmp_path / "x").exists()
    assert main(["study", "speed", "--out", str(tmp_path / "y"), "--methods", "nope"]) != 0
    assert "diffusion-mic: error: unknown speed method" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


@pytest.mark.slow
def test_quick_speed_study_has_every_row(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed")
    written = run_study("speed", out=out, quick=True)
    doc = json.loads(Path(written["json"]).read_text(encoding="utf-8"))
    assert [speed.sweep_steps(sub, "dmic") for sub in speed.SUBTASKS] == [(1, 2, 4)] * 2
    assert len(doc["methods"]) == 2 * (1 + len(speed.SAMPLERS) * (3 + len(speed.STEPS)))
    for sub in speed.SUBTASKS:
        rows = [r for r in doc["methods"].values() if speed.headline_table(sub) in r["tables"]]
        assert len(rows) == 2
    assert all(r["seconds_per_volume"] > 0 for r in doc["methods"].values())
    assert QUICK.steps == doc["budget"]["steps"]
