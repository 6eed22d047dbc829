"""The study's Markdown table and figure."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

NOTE = ("Physicians' scores (the survey's Table 6) cannot be reproduced here: no readers took part. "
        "PSNR/SSIM: each generated image against its nearest held-out real image of the same caption "
        "(highest SSIM), mean ± sd over all generated images. MS-SSIM: mean pairwise MS-SSIM of a prompt's "
        "generated images (3 scales, kernel 3; lower = more diverse). MMD: MONAI's unbiased linear-kernel "
        "MMD on the base's VAE-encoder posterior means (trained here), generated vs held-out real. "
        "MS-SSIM and MMD: mean ± sd over the prompts.")


def summary(run: dict[str, Any]) -> dict[str, tuple[float, float]]:
    prompts = run["prompts"].values()
    pooled = {k: np.concatenate([p[k] for p in prompts]) for k in ("psnr", "ssim")}
    per = {k: np.array([p[k] for p in prompts]) for k in ("ms_ssim", "ms_ssim_real", "mmd")}
    return {k: (float(v.mean()), float(v.std())) for k, v in {**pooled, **per}.items()}


def table(result: dict[str, Any]) -> str:
    lines = ["| method | images | PSNR dB | SSIM | MS-SSIM (gen) | MMD | fine-tune (steps, trained params, CPU s) |",
             "|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        s = summary(run)
        ft = run["finetune"]
        train = "—" if ft is None else f"{ft['steps']}, {ft['trainable_parameters']:,}, {run['cpu_time_s']:.0f}"
        lines.append(f"| {run['method']} | {run['images']} | {s['psnr'][0]:.2f} ± {s['psnr'][1]:.2f} | "
                     f"{s['ssim'][0]:.3f} ± {s['ssim'][1]:.3f} | {s['ms_ssim'][0]:.3f} ± {s['ms_ssim'][1]:.3f} | "
                     f"{s['mmd'][0]:.3f} ± {s['mmd'][1]:.3f} | {train} |")
    real = np.array([p["ms_ssim_real"] for p in result["runs"][0]["prompts"].values()])
    lines.append(f"| held-out real | {sum(result['held_out_images'].values())} | — | — | "
                 f"{real.mean():.3f} ± {real.std():.3f} | — | — |")
    return "\n".join(lines)


def write_report(result: dict[str, Any], samples: dict[str, np.ndarray], reals: dict[str, Any], folder: Path) -> None:
    write_table(result, folder / "table.md")
    figure(result, samples, reals, folder / "study.png")


def write_table(result: dict[str, Any], path: Path) -> None:
    budget = (f"Budget: {result['finetune_steps']} fine-tuning steps per run (batch 8), {result['images_per_prompt']} "
              f"images per prompt, {result['sampler']}; whole study {result['cpu_time_s'] / 60:.1f} CPU min, "
              f"{result['wall_time_s'] / 60:.1f} min wall.")
    base = result.get("base_card") or {}
    if base:
        budget += (f" Base ({base.get('size')}, {base.get('resolution')} px): {base.get('images')} images, "
                   f"{base.get('vae_steps')} VAE + {base.get('steps')} UNet/text steps (batch {base.get('batch_size')}), "
                   f"{base.get('wall_time_s', 0) / 60:.0f} min wall.")
    prompts = "\n".join(f"{i + 1}. `{p}` ({n} held-out real images)" for i, (p, n) in
                        enumerate(result["held_out_images"].items()))
    path.write_text(f"{table(result)}\n\nPrompts:\n{prompts}\n\n{budget}\n\n{NOTE}\n", encoding="utf-8")


def figure(result: dict[str, Any], samples: dict[str, np.ndarray], reals: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    methods, sizes = result["methods"], result["sizes"]
    base = summary(result["runs"][0])
    by = {(r["method"], r["images"]): summary(r) for r in result["runs"][1:]}
    fig = plt.figure(figsize=(14, 9))
    for i, (key, label) in enumerate((("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("ms_ssim", "MS-SSIM (gen)"), ("mmd", "MMD"))):
        ax = fig.add_subplot(2, 4, i + 1)
        for m in methods:
            mean = [by[(m, n)][key][0] for n in sizes]
            sd = [by[(m, n)][key][1] for n in sizes]
            ax.errorbar(sizes, mean, yerr=sd, marker="o", capsize=3, label=m)
        ax.axhline(base[key][0], color="grey", ls="--", label="base")
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.set_xlabel("fine-tuning images")
        ax.set_title(label)
        if i == 0:
            ax.legend(fontsize=7)
    # samples: one row per source (held-out real, base, each method at the largest size), two per prompt
    prompts = result["prompts"]
    rows = [("real", [np.asarray(reals[p][:2, 0]) * 255 for p in prompts]),
            ("base", [samples[f"base-0-{k}"][:2].mean(axis=3) for k in range(len(prompts))])]
    rows += [(f"{m} {sizes[-1]}", [samples[f"{m}-{sizes[-1]}-{k}"][:2].mean(axis=3) for k in range(len(prompts))])
             for m in methods]
    grid = np.concatenate([np.concatenate([np.concatenate(list(imgs), axis=1) for imgs in per], axis=1)
                           for _, per in rows], axis=0)
    ax = fig.add_subplot(2, 1, 2)
    ax.imshow(grid, cmap="gray", vmin=0, vmax=255)
    h = grid.shape[0] // len(rows)
    ax.set_yticks([h * (i + 0.5) for i in range(len(rows))], [r[0] for r in rows])
    w = grid.shape[1] // len(prompts)
    ax.set_xticks([w * (k + 0.5) for k in range(len(prompts))], [f"prompt {k + 1}" for k in range(len(prompts))])
    fig.suptitle("Text-to-image fine-tuning on a concept the base never saw (two samples per prompt)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
