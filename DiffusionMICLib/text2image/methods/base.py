"""What every fine-tuning method provides to the shared training loop (finetune.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class Method:
    name = ""
    lr = 1e-4
    trains_text = False          # True: the text encoder runs inside the graph (embedding)
    full_model = False           # True: writes a whole model folder (DreamBooth)

    def __init__(self, rank: int = 4, token: str | None = None, prior_images: int = 0):
        self.rank, self.token, self.prior_images = rank, token, prior_images

    def prepare(self, pipe) -> list[torch.nn.Parameter]:
        """Freeze the base, add this method's parts; returns the parameters to train."""
        raise NotImplementedError

    def after_step(self, pipe) -> None:
        """Called after each optimiser step (the embedding method restores the other rows)."""

    def save(self, pipe, folder: Path) -> list[str]:
        """Write this method's weights into folder; returns the file names."""
        raise NotImplementedError

    def card(self) -> dict[str, Any]:
        return {}

    @staticmethod
    def apply(pipe, folder: Path, card: dict[str, Any]) -> None:
        """Load saved weights into a pipeline built from the base."""
        raise NotImplementedError


def freeze(pipe) -> None:
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
