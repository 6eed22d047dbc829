"""`diffusion-mic demo`: the main job, run on a held-out phantom subject.

It makes a small phantom training set and one held-out subject (a seed training never uses),
trains a tiny denoiser for about a minute, denoises the held-out subject's T1, and writes the
volumes (NRRD), metrics.json and a figure; it prints PSNR/SSIM before and after.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from .api import denoise, evaluate
from .engine.pipeline import train
from .phantom import write_phantom
from .progress import Progress
from .volume import read_volume, write_volume

HELDOUT_SEED = 9001
DEMO_SETTINGS = {
    "name": "demo-denoise",
    "network": {"channels": [32, 64], "attention_levels": [False, False], "norm_num_groups": 16},
    "schedule": {"prediction_type": "sample", "train_steps": 4},
    "sampler": {"steps": 4},
    "patch": [48, 48],
    "train": {"batch_size": 8, "ema_start": 50, "ema_decay": 0.98, "lr": 1e-3, "time_limit_s": 60, "seed": 0},
}


def main(out: Path, progress: Progress | None = None, train_seconds: float = 60) -> dict[str, Any]:
    progress = progress or Progress()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    write_phantom(out / "train-data", subjects=3, seed=0, noise=5.0)
    write_phantom(out / "heldout", subjects=1, seed=HELDOUT_SEED, noise=5.0)
    settings = json.loads(json.dumps(DEMO_SETTINGS))
    settings["train"]["time_limit_s"] = train_seconds
    card = train("denoise", out / "train-data", out / "model-denoise", settings=settings, max_steps=100000,
                 progress=progress, resume=False)
    case = "phantom_000"
    noisy = read_volume(out / "heldout" / "imagesTr" / f"{case}_0000.nii.gz")
    clean = read_volume(out / "heldout" / "cleanTr" / f"{case}_0000.nii.gz")
    labels = read_volume(out / "heldout" / "labelsTr" / f"{case}.nii.gz")
    brain = labels.with_array((labels.array > 0).astype(np.uint8))
    result = denoise(noisy, out / "model-denoise", progress=progress, ensemble=2).outputs["output"]
    files = {"input": write_volume(noisy, out / "t1-noisy.nrrd"), "result": write_volume(result, out / "t1-denoised.nrrd"),
             "reference": write_volume(clean, out / "t1-clean.nrrd")}
    before, after = evaluate("denoise", noisy, clean, brain), evaluate("denoise", result, clean, brain)
    metrics = {"denoise": {"before": before, "after": after, "gain_db": after["psnr"] - before["psnr"],
                           "training_steps": card.training["steps"], "training_s": card.training["wall_time_s"]},
               "wall_time_s": round(time.perf_counter() - t0, 1)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    figure = _figure(out / "denoise.png", noisy, result, clean)
    print(f"\n{'task':<10}{'metric':<14}{'input':>9}{'result':>9}")
    print(f"{'denoise':<10}{'PSNR dB':<14}{before['psnr']:>9.2f}{after['psnr']:>9.2f}")
    print(f"{'denoise':<10}{'SSIM':<14}{before['ssim']:>9.3f}{after['ssim']:>9.3f}")
    print(f"trained {card.training['steps']} steps in {card.training['wall_time_s']:.0f} s; "
          f"total {metrics['wall_time_s']:.0f} s; files in {out}")
    return {"metrics": str(out / "metrics.json"), "figure": str(figure), **{k: str(v) for k, v in files.items()}}


def _figure(path: Path, noisy, result, clean) -> Path:
    """input | result | reference | |difference| on the middle axial slice."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    z = noisy.array.shape[0] // 2
    panels = [noisy.array[z], result.array[z], clean.array[z], np.abs(result.array[z] - clean.array[z])]
    titles = ["input (noisy)", "denoised", "reference (clean)", "|result - reference|"]
    vmax = float(np.percentile(clean.array, 99.5))
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.4))
    for ax, img, title in zip(axes, panels, titles):
        ax.imshow(img[::-1], cmap="gray", vmin=0, vmax=vmax if "|" not in title else vmax / 4)
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
