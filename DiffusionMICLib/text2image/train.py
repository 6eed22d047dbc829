"""The denoising loss of Stable Diffusion and the small-base pre-training (VAE, then UNet + text encoder)."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DiffusionMICError
from ..progress import Progress
from .data import CaptionedImages, load_images, read_captions
from .model import build_base, resolve_device, save_base

CAPTION_DROPOUT = 0.1   # empty captions in pre-training, for classifier-free guidance


def encode_text(pipe, captions: list[str]) -> torch.Tensor:
    """The text encoder's last hidden states for captions padded to the tokenizer's 77 tokens."""
    tok = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    return pipe.text_encoder(tok.input_ids.to(pipe.text_encoder.device))[0]


@torch.no_grad()
def encode_latents(pipe, images: np.ndarray, batch: int = 64) -> torch.Tensor:
    """VAE posterior (mean, std) of each image, stacked along dim 1: (N, 2, C, h, w)."""
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i:i + batch]).to(pipe.vae.device, pipe.vae.dtype)
        d = pipe.vae.encode(x).latent_dist
        out.append(torch.stack([d.mean, d.std], 1).cpu())
    return torch.cat(out)


def sample_latents(pipe, posterior: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    mean, std = posterior[:, 0], posterior[:, 1]
    z = mean + std * torch.randn(mean.shape, generator=generator)
    return (z * pipe.vae.config.scaling_factor).to(pipe.unet.device)


def denoising_loss(pipe, latents: torch.Tensor, context: torch.Tensor, generator: torch.Generator,
                   reduce: bool = True) -> torch.Tensor:
    """MSE between the UNet's prediction and its target (noise, or v for v-prediction bases)."""
    sched = pipe.scheduler
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    t = torch.randint(0, sched.config.num_train_timesteps, (len(latents),), generator=generator).to(latents.device)
    noisy = sched.add_noise(latents, noise, t)
    target = sched.get_velocity(latents, noise, t) if sched.config.prediction_type == "v_prediction" else noise
    pred = pipe.unet(noisy, t, encoder_hidden_states=context).sample
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return loss.mean() if reduce else loss


def pretrain(data: str | Path, out: str | Path, *, max_steps: int = 2000, size: str = "tiny", resolution: int = 32,
             batch_size: int = 32, lr: float = 5e-4, seed: int = 0, device: str = "auto",
             progress: Progress | None = None) -> dict[str, Any]:
    """Train a small Stable-Diffusion-architecture base from scratch on captioned images.

    First the VAE (max_steps // 2 steps, L1 + 1e-6 KL), whose latent scale is then set to unit
    variance; then the UNet and text encoder together (max_steps steps, 10 % empty captions).
    """
    if max_steps < 1:
        raise DiffusionMICError("--max-steps must be at least 1")
    out = Path(out)
    if out.exists():
        raise DiffusionMICError(f"'{out}' exists already; choose a new folder")
    progress = progress or Progress("none")
    t0 = time.perf_counter()
    captioned = read_captions(data)
    device = resolve_device(device)
    pipe = build_base(size, resolution, seed).to(device)
    images = load_images(captioned, resolution)
    gen = torch.Generator().manual_seed(seed)

    vae = pipe.vae
    opt = torch.optim.AdamW(vae.parameters(), lr=lr * 2)
    vae_steps = max(1, max_steps // 2)
    progress.start("pretrain vae", vae_steps)
    for _ in range(vae_steps):
        x = torch.from_numpy(images[_batch(len(images), batch_size, gen)]).to(device)
        d = vae.encode(x).latent_dist
        recon = vae.decode(d.sample(generator=None)).sample
        loss = F.l1_loss(recon, x) + 1e-6 * d.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        progress.advance(loss=round(loss.item(), 4))
    vae.eval().requires_grad_(False)
    posterior = encode_latents(pipe, images)
    vae.register_to_config(scaling_factor=float(1.0 / posterior[:, 0].std()))

    unet, text = pipe.unet, pipe.text_encoder
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    losses = []
    progress.start("pretrain unet", max_steps)
    for _ in range(max_steps):
        idx = _batch(len(images), batch_size, gen)
        drop = torch.rand(len(idx), generator=gen) < CAPTION_DROPOUT
        captions = ["" if d else captioned.captions[i] for i, d in zip(idx, drop)]
        loss = denoising_loss(pipe, sample_latents(pipe, posterior[idx], gen), encode_text(pipe, captions), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        progress.advance(loss=round(loss.item(), 4))
    progress.close()
    card = {"kind": "text2image-base", "size": size, "resolution": resolution, "data": str(data),
            "images": len(captioned), "captions": sorted(set(captioned.captions)), "vae_steps": vae_steps,
            "steps": max_steps, "batch_size": batch_size, "lr": lr, "seed": seed,
            "final_loss": round(float(np.mean(losses[-50:])), 5),
            "wall_time_s": round(time.perf_counter() - t0, 1), "command": command_line()}
    pipe.to("cpu")
    save_base(pipe, out, card)
    return {"base": str(out), **{k: card[k] for k in ("images", "vae_steps", "steps", "final_loss", "wall_time_s")}}


def _batch(n: int, batch_size: int, gen: torch.Generator) -> np.ndarray:
    return torch.randint(0, n, (min(batch_size, n),), generator=gen).numpy()


def command_line() -> str:
    return "diffusion-mic " + " ".join(sys.argv[1:]) if Path(sys.argv[0]).name in ("diffusion-mic", "__main__.py") else ""


def subset(data: CaptionedImages, n: int | None, seed: int) -> CaptionedImages:
    """n images drawn without replacement (seeded); all of them when n is None."""
    if n is None or n >= len(data):
        if n is not None and n > len(data):
            raise DiffusionMICError(f"asked for {n} images but the folder has {len(data)}")
        return data
    order = np.random.default_rng(seed).permutation(len(data))[:n]
    return CaptionedImages([data.files[i] for i in order], [data.captions[i] for i in order])


