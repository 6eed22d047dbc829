"""`diffusion-mic demo`: the main job, all five tasks with the bundled models on a held-out phantom subject.

It writes one phantom subject from a seed that training never uses (2 mm, 5 % Rician noise),
runs denoising (T1), T1 + T2 -> FLAIR, segmentation, anomaly detection, generation and generation
from the subject's label map (the bundled segmenter's Dice on the drawn images) with the bundled
models (Resources/Models), and writes into --out: the subject's images and labels and
every result as NRRD (load them side by side in Slicer), metrics.json, one PNG per task
(input | result | reference | difference, axial and coronal through the largest lesion) and
summary.png. It prints a table of the metrics against the targets of the bundled models.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import heldout
from .datasets import read_dataset
from .phantom import CHANNELS, write_phantom
from .progress import Progress
from .volume import write_volume

HELDOUT_SEED = 9001
BUNDLED = {"denoise": "brain-mri-denoise", "translate": "brain-mri-t1t2-to-flair",
           "segment": "brain-mri-lesion-segment", "anomaly": "brain-mri-anomaly", "generate": "brain-mri-generate-2mm",
           "from-labels": "brain-mri-labels-to-mri"}


def main(out: Path, progress: Progress | None = None, device: str = "auto") -> dict[str, Any]:
    progress = progress or Progress()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    write_phantom(out / "heldout", subjects=1, seed=HELDOUT_SEED, noise=5.0)
    case = read_dataset(out / "heldout").cases[0]
    for ch in CHANNELS:
        write_volume(case.read(ch), out / f"subject-{ch}.nrrd")
    write_volume(case.read_label(), out / "subject-labels.nrrd")
    metrics: dict[str, Any] = {"subject": {"phantom_seed": HELDOUT_SEED, "noise_percent": 5.0, "case": case.id},
                               "models": dict(BUNDLED)}
    outcomes = {}
    for task, model in BUNDLED.items():
        t = time.perf_counter()
        if task == "generate":
            outcome = heldout.generate(model, [case], progress, count=2, device=device)
        elif task == "from-labels":     # the segment task's result on the real images is reused
            outcome = heldout.from_labels(model, case, progress, segmenter=BUNDLED["segment"],
                                          real_segmentation=outcomes["segment"].outputs["segmentation"], device=device)
        else:
            outcome = heldout.RUNNERS[task](model, case, progress, device=device)
        for stem, volume in outcome.outputs.items():
            write_volume(volume, out / f"{stem}.nrrd")
        task_figure(out / f"{task}.png", task, outcome)
        metrics[task] = {**outcome.metrics, "wall_time_s": round(time.perf_counter() - t, 1)}
        outcomes[task] = outcome
    rows = table(metrics)
    summary_figure(out / "summary.png", outcomes, rows)
    metrics["wall_time_s"] = round(time.perf_counter() - t0, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    width = max(len("metric"), *(len(row[1]) for row in rows)) + 2
    print(f"\n{'task':<10}{'metric':<{width}}{'baseline':>10}{'result':>10}  target")
    for row in rows:
        print(f"{row[0]:<10}{row[1]:<{width}}{row[2]:>10}{row[3]:>10}  {row[4]}")
    print(f"total {metrics['wall_time_s']:.0f} s; volumes (NRRD), metrics.json and figures in {out}")
    return {"out": str(out), "metrics": str(out / "metrics.json"), "summary": str(out / "summary.png"),
            "wall_time_s": metrics["wall_time_s"]}


def table(m: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(task, metric, baseline, result, target) rows; the baseline is the input or the input copied (from
    labels: the segmenter's Dice on the real images)."""
    f = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    d, t, s, a = m["denoise"], m["translate"], m["segment"], m["anomaly"]
    rows = [("denoise", "PSNR dB (T1, 5 %)", f(d["input"]["psnr"]), f(d["result"]["psnr"]), "input + 6"),
            ("denoise", "SSIM", f(d["input"]["ssim"], 3), f(d["result"]["ssim"], 3), ""),
            ("translate", "PSNR dB (FLAIR)", f(t["baseline_copy_input"]["psnr"]), f(t["result"]["psnr"]), ">= 26"),
            ("translate", "SSIM", "-", f(t["result"]["ssim"], 3), ">= 0.85")]
    for name, per in s["labels"].items():
        rows.append(("segment", f"Dice {name}", "-", f(per["dice"], 3), ">= 0.70" if name == "lesion" else ">= 0.85"))
    rows.append(("anomaly", "voxel AUROC", "-", f(a["voxel_auroc"], 3), ">= 0.90"))
    for ch, g in m["generate"]["per_channel"].items():
        rows.append(("generate", f"tissue mean err % ({ch})", "-", f(100 * max(g["tissue_mean_relative_error"]), 1),
                     "<= 10"))
    seg = m["from-labels"]["segmenter"]
    for name, dice in seg["dice_drawn"].items():
        rows.append(("labels", f"Dice {name} (drawn)", f(seg["dice_real"][name], 3), f(dice, 3),
                     "" if name == "lesion" else ">= 0.85"))
    return rows


def _slices(volume, focus, fractions) -> list[np.ndarray]:
    """Axial and coronal slices (superior / anterior up) through focus, or through the given fractions."""
    a = volume.array.astype(np.float32)
    z, y, _ = focus if focus is not None else [int(f * n) for f, n in zip(fractions, a.shape)]
    return [a[min(z, a.shape[0] - 1)][::-1], a[:, min(y, a.shape[1] - 1)][::-1]]


def _show(ax, image: np.ndarray, style: str, reference: np.ndarray) -> None:
    """Draw a slice: gray (0 to its 99.5th percentile), labels, heat map, or a difference on the reference's scale."""
    if style == "labels":
        ax.imshow(np.ma.masked_equal(image, 0), cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
        ax.set_facecolor("black")
        return
    vmax = float(np.percentile(reference, 99.5)) or 1.0
    if style == "heat":
        ax.imshow(image, cmap="hot", vmin=0, vmax=float(np.percentile(image, 99.9)) or 1.0)
    elif style == "diff":
        ax.imshow(image, cmap="magma", vmin=0, vmax=1.0 if image.max() <= 1 and np.all(image == np.rint(image)) else vmax / 4)
    else:
        ax.imshow(image, cmap="gray", vmin=0, vmax=vmax)


def task_figure(path: Path, task: str, outcome: heldout.Outcome) -> Path:
    """Two rows (axial, coronal) of input | result | reference | difference, through the same voxel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, len(outcome.panels), figsize=(3 * len(outcome.panels), 6.2), squeeze=False)
    reference = _slices(outcome.panels[2].volume, outcome.focus, (0.5, 0.5, 0.5))   # scales the difference
    for j, panel in enumerate(outcome.panels):
        for i, image in enumerate(_slices(panel.volume, outcome.focus, (0.5, 0.5, 0.5))):
            _show(axes[i, j], image, panel.style, image if panel.style == "gray" else reference[i])
            axes[i, j].axis("off")
        axes[0, j].set_title(panel.title, fontsize=10)
    fig.suptitle(task)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def summary_figure(path: Path, outcomes: dict[str, heldout.Outcome], rows: list[tuple]) -> Path:
    """One row per task (axial slices of its four panels) and the metrics table beneath."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=(12, 3 * len(outcomes) + 3))
    grid = fig.add_gridspec(len(outcomes) + 1, 4, height_ratios=[3] * len(outcomes) + [3])
    for r, (task, outcome) in enumerate(outcomes.items()):
        reference = _slices(outcome.panels[2].volume, outcome.focus, (0.5, 0.5, 0.5))[0]
        for j, panel in enumerate(outcome.panels[:4]):
            ax = fig.add_subplot(grid[r, j])
            image = _slices(panel.volume, outcome.focus, (0.5, 0.5, 0.5))[0]
            _show(ax, image, panel.style, image if panel.style == "gray" else reference)
            ax.set_title(f"{task}: {panel.title}" if j == 0 else panel.title, fontsize=9)
            ax.axis("off")
    ax = fig.add_subplot(grid[-1, :])
    ax.axis("off")
    ax.table(cellText=[list(r) for r in rows], colLabels=["task", "metric", "baseline", "result", "target"],
             loc="center", cellLoc="left").scale(1, 1.1)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
