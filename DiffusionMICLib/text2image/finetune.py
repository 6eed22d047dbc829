"""Fine-tune a base with one of the four methods; the base on disk is only ever read."""
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
from .methods import method_class
from .methods.dreambooth import DreamBooth
from .model import CARD, base_sha256, load_base, resolve_device
from .train import command_line, denoising_loss, encode_latents, encode_text, sample_latents, subset

ADAPTER_CARD = "adapter.json"


def finetune(base: str | Path, data: str | Path | CaptionedImages, method: str, out: str | Path, *,
             max_steps: int = 400, rank: int = 4, prior_images: int = 0, token: str | None = None,
             images: int | None = None, batch_size: int = 8, lr: float | None = None, seed: int = 0,
             base_config: str | Path | None = None, device: str = "auto",
             progress: Progress | None = None) -> dict[str, Any]:
    """Train `method` on captioned images; writes `out` (adapter files + card, or a DreamBooth model folder)."""
    cls = method_class(method)
    if max_steps < 1:
        raise DiffusionMICError("--max-steps must be at least 1")
    out, base = Path(out), Path(base)
    if out.exists():
        raise DiffusionMICError(f"'{out}' exists already; choose a new folder")
    if base.resolve() in out.resolve().parents or base.resolve() == out.resolve():
        raise DiffusionMICError(f"--out '{out}' lies inside the base '{base}'; the base is never written")
    captioned = subset(data if isinstance(data, CaptionedImages) else read_captions(data), images, seed)
    progress = progress or Progress("none")
    t0 = time.perf_counter()
    device = resolve_device(device)
    base_hash = base_sha256(base)
    pipe = load_base(base, base_config, device)
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    m = cls(rank=rank, token=token, prior_images=prior_images)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    posterior = encode_latents(pipe, load_images(captioned, resolution))
    prior = None
    if isinstance(m, DreamBooth) and prior_images > 0:
        progress.start("prior images", 1)
        prior_latents, prior_prompts = m.make_prior(pipe, captioned.captions, seed)
        with torch.no_grad():
            prior = (prior_latents, _contexts(pipe, prior_prompts))
        progress.advance()
    params = m.prepare(pipe)
    contexts = None if m.trains_text else _contexts(pipe, captioned.captions)
    opt = torch.optim.AdamW(params, lr=lr or m.lr, weight_decay=0.0)
    losses, prior_losses = [], []
    progress.start(f"finetune {method}", max_steps)
    for _ in range(max_steps):
        idx = torch.randint(0, len(captioned), (min(batch_size, len(captioned)),), generator=gen).numpy()
        context = encode_text(pipe, [captioned.captions[i] for i in idx]) if contexts is None else contexts[idx]
        loss = denoising_loss(pipe, sample_latents(pipe, posterior[idx], gen), context, gen)
        losses.append(loss.item())
        if prior is not None:
            pidx = torch.randint(0, len(prior[0]), (len(idx),), generator=gen)
            prior_loss = denoising_loss(pipe, prior[0][pidx], prior[1][pidx], gen)
            prior_losses.append(prior_loss.item())
            loss = loss + m.prior_weight * prior_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        m.after_step(pipe)
        progress.advance(loss=round(losses[-1], 4))
    progress.close()
    card = {"kind": "text2image-adapter", "method": method, "base": str(base), "base_sha256": base_hash,
            "base_config": str(base_config) if base_config else None, "data": str(getattr(data, "root", data)),
            "images": len(captioned), "steps": max_steps, "batch_size": batch_size, "lr": lr or m.lr, "seed": seed,
            "trainable_parameters": int(sum(p.numel() for p in params)),
            "final_loss": round(float(np.mean(losses[-20:])), 5),
            "prior_loss": round(float(np.mean(prior_losses)), 5) if prior_losses else None,
            "wall_time_s": round(time.perf_counter() - t0, 1), "command": command_line(), **m.card()}
    if m.trains_text:
        card["trainable_parameters"] = int(params[0].shape[1])    # one row of the embedding table
    _write(pipe.to("cpu"), m, out, card)
    return {"adapter": str(out), **{k: card[k] for k in ("method", "images", "steps", "trainable_parameters",
                                                          "final_loss", "prior_loss", "wall_time_s")}}


@torch.no_grad()
def _contexts(pipe, captions: list[str]) -> torch.Tensor:
    unique = sorted(set(captions))
    encoded = dict(zip(unique, encode_text(pipe, unique)))
    return torch.stack([encoded[c] for c in captions])


def _write(pipe, method, out: Path, card: dict[str, Any]) -> None:
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        card["files"] = method.save(pipe, tmp)
        if method.full_model:     # a DreamBooth folder is a base of its own, its card says where from
            base_card = json.loads((Path(card["base"]) / CARD).read_text(encoding="utf-8")) if (Path(card["base"]) / CARD).is_file() else {}
            (tmp / CARD).write_text(json.dumps({**base_card, "kind": "text2image-base", "finetune": card}, indent=2), encoding="utf-8")
        else:
            (tmp / ADAPTER_CARD).write_text(json.dumps(card, indent=2), encoding="utf-8")
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
