"""DreamBooth: all UNet weights fine-tuned, with the prior-preservation loss (Ruiz et al. 2023).

Before training, the base draws `prior_images` class images from the class prompts (the captions
with the token removed); every step then adds the denoising loss on a batch of those, weighted by
`prior_weight`, so the base keeps what it knew about the class. Written here: diffusers has it only
in an example script.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from .base import Method, freeze


def class_prompt(caption: str, token: str | None) -> str:
    """The caption without the concept's token (the prompt of the prior, 'class' images)."""
    if not token:
        return caption
    return re.sub(r"\s+", " ", re.sub(rf"(?<!\w){re.escape(token)}(?!\w)", "", caption)).strip(" ,")


class DreamBooth(Method):
    name = "dreambooth"
    lr = 1e-4
    full_model = True
    prior_weight = 1.0

    def prepare(self, pipe):
        freeze(pipe)
        pipe.unet.requires_grad_(True)
        return list(pipe.unet.parameters())

    @torch.no_grad()
    def make_prior(self, pipe, captions: list[str], seed: int, steps: int = 10, batch: int = 16) -> tuple[torch.Tensor, list[str]]:
        """Latents (scaled) of prior images drawn by the base itself, with their class prompts."""
        from diffusers import DPMSolverMultistepScheduler
        prompts = sorted({class_prompt(c, self.token) for c in captions})
        chosen = [prompts[i % len(prompts)] for i in range(self.prior_images)]
        sampler = pipe.scheduler
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(sampler.config)
        latents = []
        try:
            for i in range(0, len(chosen), batch):
                g = torch.Generator().manual_seed(seed + i)
                latents.append(pipe(chosen[i:i + batch], num_inference_steps=steps, guidance_scale=3.0,
                                    generator=g, output_type="latent").images)
        finally:
            pipe.scheduler = sampler
        return torch.cat(latents), chosen

    def save(self, pipe, folder: Path) -> list[str]:
        pipe.save_pretrained(folder, safe_serialization=True)
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())

    def card(self) -> dict[str, Any]:
        return {"prior_images": self.prior_images, "prior_weight": self.prior_weight, "token": self.token}

    @staticmethod
    def apply(pipe, folder: Path, card: dict[str, Any]) -> None:
        raise NotImplementedError("a DreamBooth folder is a base of its own")
