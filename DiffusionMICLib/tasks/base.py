"""What every task provides to the shared engine, and the options a run takes."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from ..datasets import Dataset
from ..errors import DiffusionMICError
from ..engine.batches import TrainingCase
from ..engine.trainer import Batch
from ..models import ModelCard
from ..progress import Progress
from ..volume import Volume


@dataclass
class RunOptions:
    """Sampling options; None takes the model card's default."""

    sampler: str | None = None
    steps: int | None = None
    seed: int = 0
    device: str = "auto"
    strength: float | None = None
    ensemble: int | None = None
    guidance: float | None = None
    count: int = 1
    condition: str | None = None
    batch_size: int = 16
    sigma: float | None = None      # denoise: the input's noise standard deviation, its units (None: estimated)
    lesion_load: float | None = None   # generate, a lesion-map model: mL of lesion to compose (None: a training map)

    def with_card_defaults(self, card: ModelCard) -> "RunOptions":
        d = card.defaults
        resolved = replace(
            self,
            sampler=self.sampler or card.sampler.get("name", "dpm++2m"),
            steps=self.steps if self.steps is not None else card.sampler.get("steps", 10),
            strength=self.strength if self.strength is not None else d.get("strength", 1.0),
            ensemble=self.ensemble if self.ensemble is not None else d.get("ensemble", 1),
            guidance=self.guidance if self.guidance is not None else d.get("guidance", 1.0),
        )
        resolved.validate()
        card.noise_schedule.limit_steps(resolved.steps)
        return resolved

    def validate(self) -> None:
        """Reject impossible values with one clear line before any work starts."""
        checks = [(self.steps is None or self.steps >= 1, f"--steps must be at least 1, got {self.steps}"),
                  (self.strength is None or 0 < self.strength <= 1, f"--strength must be in (0, 1], got {self.strength}"),
                  (self.ensemble is None or self.ensemble >= 1, f"--ensemble must be at least 1, got {self.ensemble}"),
                  (self.count >= 1, f"--count must be at least 1, got {self.count}"),
                  (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
                  (self.sigma is None or self.sigma > 0, f"--sigma must be above 0, got {self.sigma}"),
                  (self.lesion_load is None or self.lesion_load > 0,
                   f"--lesion-load must be above 0 mL, got {self.lesion_load}")]
        for ok, message in checks:
            if not ok:
                raise DiffusionMICError(message)


@dataclass
class RunResult:
    outputs: dict[str, Volume]                      # "output" is the main one
    info: dict[str, Any] = field(default_factory=dict)
    # in memory only, never written: segment's "probabilities" (C, z, y, x) on the input's grid
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


class Task:
    """A task says what it trains on and how it turns a model's samples into outputs."""

    name: str = ""
    def make_card(self, dataset: Dataset, settings: dict[str, Any]) -> ModelCard:
        raise NotImplementedError

    def training_cases(self, card: ModelCard, dataset: Dataset, cases: list) -> list[TrainingCase]:
        raise NotImplementedError

    def augment(self, card: ModelCard):
        """Optional per-batch augmentation: (Batch, torch.Generator) -> Batch."""
        return None

    def training_noise(self, card: ModelCard, device: torch.device):
        """Optional forward-process noise for training, noise(shape, generator) -> Tensor; None: Gaussian."""
        return None

    def training_loss(self, card: ModelCard):
        """Optional term on an x0-prediction model's output, added to the MSE: loss(x0, Batch) -> Tensor."""
        return None

    def calibrate(self, card: ModelCard, network: torch.nn.Module, dataset: Dataset, cases: list,
                  device: torch.device, progress: Progress) -> None:
        """Optional, after training: measure with the trained (EMA) network what the card records
        (e.g. a detection threshold) by updating `card` in place."""

    def run(self, card: ModelCard, network: torch.nn.Module, volumes: list[Volume], options: RunOptions,
            progress: Progress, device: torch.device) -> RunResult:
        raise NotImplementedError

    def evaluate(self, pred: Volume, ref: Volume, mask: Volume | None) -> dict[str, Any]:
        raise NotImplementedError


__all__ = ["Batch", "RunOptions", "RunResult", "Task", "TrainingCase"]
