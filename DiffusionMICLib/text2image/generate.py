"""Images from a base (and an adapter): PNG, and 2D NRRD for Slicer; the same seed, the same bytes."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DiffusionMICError
from ..progress import Progress
from .finetune import ADAPTER_CARD
from .methods import method_class
from .model import CARD, base_sha256, load_base, resolve_device


def load_pipeline(base: str | Path, adapter: str | Path | None = None, base_config: str | Path | None = None,
                  device: str = "cpu"):
    """The base's pipeline with an adapter applied (a DreamBooth folder is loaded as the base)."""
    if adapter is None:
        return load_base(base, base_config, device)
    adapter = Path(adapter)
    if (adapter / CARD).is_file() and (adapter / "model_index.json").is_file():
        return load_base(adapter, None, device)          # DreamBooth: a whole model
    if not (adapter / ADAPTER_CARD).is_file():
        raise DiffusionMICError(f"'{adapter}' is not an adapter folder ({ADAPTER_CARD} is missing)")
    card = json.loads((adapter / ADAPTER_CARD).read_text(encoding="utf-8"))
    if base_sha256(base) != card["base_sha256"]:
        raise DiffusionMICError(f"adapter '{adapter}' was trained on another base (SHA-256 {card['base_sha256'][:12]}...), "
                                f"not on '{base}'")
    pipe = load_base(base, base_config, device)
    method_class(card["method"]).apply(pipe, adapter, card)
    return pipe


def sample(pipe, prompt: str, seeds: list[int], steps: int = 20, guidance: float = 3.0,
           progress: Progress | None = None) -> np.ndarray:
    """uint8 RGB images (N, H, W, 3), one per seed, each drawn on its own (so counts do not matter)."""
    from diffusers import DPMSolverMultistepScheduler
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    images = []
    for seed in seeds:
        g = torch.Generator("cpu").manual_seed(seed)
        with torch.no_grad():
            x = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=g, height=size, width=size,
                     output_type="np").images[0]
        images.append((np.clip(x, 0, 1) * 255).round().astype(np.uint8))
        if progress is not None:
            progress.advance()
    return np.stack(images)


def generate(base: str | Path, prompt: str, out: str | Path, *, adapter: str | Path | None = None, count: int = 1,
             seed: int = 0, steps: int = 20, guidance: float = 3.0, base_config: str | Path | None = None,
             device: str = "auto", progress: Progress | None = None) -> dict[str, Any]:
    """Write count images (PNG + 2D NRRD, grey = mean of RGB) for one prompt into the folder out."""
    from PIL import Image
    import SimpleITK as sitk
    if count < 1 or steps < 1:
        raise DiffusionMICError("--count and --steps must be at least 1")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DiffusionMICError(f"'{out}' exists and is not empty; choose a new folder")
    t0 = time.perf_counter()
    pipe = load_pipeline(base, adapter, base_config, resolve_device(device))
    progress = progress or Progress("none")
    progress.start("generate", count)
    images = sample(pipe, prompt, [seed + i for i in range(count)], steps, guidance, progress)
    progress.close()
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = []
    try:
        for i, img in enumerate(images):
            stem = f"image_{i:03d}_seed{seed + i}"
            Image.fromarray(img).save(tmp / f"{stem}.png")
            grey = sitk.GetImageFromArray(img.astype(np.float32).mean(axis=2))   # LPS: row 0 anterior
            sitk.WriteImage(grey, str(tmp / f"{stem}.nrrd"))
            files += [f"{stem}.png", f"{stem}.nrrd"]
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"out": str(out), "files": files, "prompt": prompt, "seed": seed, "steps": steps, "guidance": guidance,
            "adapter": str(adapter) if adapter else None, "wall_time_s": round(time.perf_counter() - t0, 2)}
