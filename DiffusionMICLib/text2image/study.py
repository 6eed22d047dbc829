"""The survey's fine-tuning study (its Section 4.1, Fig. 5): every method at every data size and prompt.

Per prompt, generated images are scored against the held-out real images with that exact caption:
- PSNR and SSIM of each generated image against its nearest held-out real image (the real of that
  prompt with the highest SSIM), mean ± sd over the generated images of all prompts;
- MS-SSIM diversity: mean pairwise MS-SSIM among the generated images of a prompt (lower is more
  diverse; the held-out reals' own value is the reference), mean ± sd over prompts;
- MMD (MONAI's unbiased linear-kernel MMD) between generated and real images on features of a
  network trained here: the base's VAE encoder (posterior means), mean ± sd over prompts.
The physicians' scores of the survey's Table 6 cannot be reproduced here.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DiffusionMICError
from ..progress import Progress
from .data import CaptionedImages, load_images, read_captions
from .finetune import finetune
from .generate import load_pipeline, sample
from .methods import METHODS, method_class
from .model import CARD, resolve_device
from .train import command_line

METRICS = ("psnr", "ssim", "ms_ssim", "mmd")


def _grey(images: np.ndarray) -> torch.Tensor:
    """(N, 1, H, W) in [0, 1] from uint8 (N, H, W, 3) or float (N, 3, H, W) in [-1, 1]."""
    a = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else (images.transpose(0, 2, 3, 1) + 1) / 2
    return torch.from_numpy(a.mean(axis=3, keepdims=True).transpose(0, 3, 1, 2).copy())


def _pairwise(metric, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """metric(a_i, b_j) as an (len(a), len(b)) matrix."""
    i, j = torch.meshgrid(torch.arange(len(a)), torch.arange(len(b)), indexing="ij")
    return metric(a[i.flatten()], b[j.flatten()]).reshape(len(a), len(b))


def score(gen: torch.Tensor, real: torch.Tensor, features) -> dict[str, Any]:
    """The study's measures of generated against real grey images (both (N, 1, H, W) in [0, 1])."""
    from monai.metrics import MMDMetric, MultiScaleSSIMMetric, PSNRMetric, SSIMMetric
    ssim = SSIMMetric(spatial_dims=2, data_range=1.0, win_size=7, reduction="none")
    msssim = MultiScaleSSIMMetric(spatial_dims=2, data_range=1.0, kernel_size=3, weights=(1 / 3, 1 / 3, 1 / 3),
                                  reduction="none")
    psnr = PSNRMetric(max_val=1.0, reduction="none")
    s = _pairwise(ssim, gen, real)
    nearest = s.argmax(dim=1)
    p = psnr(gen, real[nearest]).flatten()
    iu = torch.triu_indices(len(gen), len(gen), 1)
    div = _pairwise(msssim, gen, gen)[iu[0], iu[1]]
    ir = torch.triu_indices(len(real), len(real), 1)
    div_real = _pairwise(msssim, real, real)[ir[0], ir[1]]
    n = min(len(gen), len(real))
    mmd = MMDMetric(y_mapping=features)(gen[:n], real[torch.randperm(len(real), generator=torch.Generator().manual_seed(0))[:n]])
    return {"psnr": p.tolist(), "ssim": s.max(dim=1).values.tolist(), "ms_ssim": float(div.mean()),
            "ms_ssim_real": float(div_real.mean()), "mmd": float(mmd.mean())}


def vae_features(pipe):
    """Grey (N, 1, H, W) in [0, 1] -> the VAE encoder's posterior means, flattened."""
    @torch.no_grad()
    def f(x: torch.Tensor) -> torch.Tensor:
        return pipe.vae.encode((x * 2 - 1).repeat(1, 3, 1, 1)).latent_dist.mean.flatten(1)
    return f


def run_study(base: str | Path, data: str | Path, out: str | Path, *, sizes: list[int], prompts: list[str],
              heldout: str | Path | None = None, methods: list[str] | None = None, max_steps: int = 200,
              count: int = 16, steps: int = 20, guidance: float = 3.0, rank: int = 4, prior_images: int = 32,
              token: str | None = None, seed: int = 0, device: str = "auto",
              progress: Progress | None = None) -> dict[str, Any]:
    methods = methods or list(METHODS)
    for m in methods:
        method_class(m)
    if "embedding" in methods and not token:
        raise DiffusionMICError("the embedding method needs --token: the concept's word in the captions")
    out = Path(out)
    if out.exists():
        raise DiffusionMICError(f"'{out}' exists already; choose a new folder")
    pool = read_captions(data)
    if heldout is None:      # the last 15 % in file order (the phantom's slices are grouped by subject)
        k = max(1, int(0.85 * len(pool)))
        pool, held = CaptionedImages(pool.files[:k], pool.captions[:k]), CaptionedImages(pool.files[k:], pool.captions[k:])
    else:
        held = read_captions(heldout)
    if max(sizes) > len(pool):
        raise DiffusionMICError(f"size {max(sizes)} is larger than the {len(pool)} fine-tuning images")
    missing = [p for p in prompts if p not in held.captions]
    if missing:
        raise DiffusionMICError(f"no held-out image has the caption '{missing[0]}' (prompts must be captions)")
    progress = progress or Progress("none")
    device = resolve_device(device)
    t0, c0 = time.perf_counter(), time.process_time()
    base_pipe = load_pipeline(base, device=device)
    features = vae_features(base_pipe)
    resolution = base_pipe.unet.config.sample_size * base_pipe.vae_scale_factor
    reals = {p: _grey(load_images(CaptionedImages([f for f, c in zip(held.files, held.captions) if c == p], []),
                                  resolution)) for p in prompts}
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "adapters").mkdir(parents=True)
    runs: list[dict[str, Any]] = []
    samples: dict[str, np.ndarray] = {}
    jobs = [("base", 0)] + [(m, n) for m in methods for n in sizes]
    progress.start("study", len(jobs))
    try:
        for method, n in jobs:
            r0, rc0 = time.perf_counter(), time.process_time()
            info = None
            if method == "base":
                pipe = base_pipe
            else:
                adapter = tmp / "adapters" / f"{method}-{n}"
                info = finetune(base, pool, method, adapter, max_steps=max_steps, rank=rank, token=token,
                                prior_images=prior_images if method == "dreambooth" else 0, images=n, seed=seed,
                                device=device)
                pipe = load_pipeline(base, adapter, device=device)
            run = {"method": method, "images": n, "prompts": {}, "finetune": info}
            for k, p in enumerate(prompts):
                gen = sample(pipe, p, [seed + 1000 * k + i for i in range(count)], steps, guidance)
                samples[f"{method}-{n}-{k}"] = gen
                run["prompts"][p] = score(_grey(gen), reals[p], features)
            run["wall_time_s"] = round(time.perf_counter() - r0, 1)
            run["cpu_time_s"] = round(time.process_time() - rc0, 1)
            runs.append(run)
            if method == "dreambooth":
                shutil.rmtree(tmp / "adapters" / f"{method}-{n}")   # a whole model each: not kept
            progress.advance()
        progress.close()
        result = {"base": str(base), "data": str(data), "heldout": str(heldout) if heldout else "last 15 % of --data",
                  "sizes": sizes, "prompts": prompts, "methods": methods, "finetune_steps": max_steps,
                  "images_per_prompt": count, "sampler": f"DPM-Solver++ 2M, {steps} steps, guidance {guidance}",
                  "rank": rank, "prior_images": prior_images, "token": token, "seed": seed,
                  "held_out_images": {p: len(r) for p, r in reals.items()}, "runs": runs,
                  "base_card": {k: v for k, v in _base_card(base).items() if k != "captions"},
                  "wall_time_s": round(time.perf_counter() - t0, 1), "cpu_time_s": round(time.process_time() - c0, 1),
                  "command": command_line()}
        (tmp / "results.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
        from .report import write_report
        write_report(result, samples, {p: reals[p] for p in prompts}, tmp)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"out": str(out), "table": str(out / "table.md"), "figure": str(out / "study.png"),
            "wall_time_s": result["wall_time_s"], "cpu_time_s": result["cpu_time_s"]}


def _base_card(base: str | Path) -> dict[str, Any]:
    card = Path(base) / CARD
    return json.loads(card.read_text(encoding="utf-8")) if card.is_file() else {}
