"""Noise schedules and samplers: diffusers schedulers driving a MONAI UNet.

MONAI's own DDIM steps with a wrong stride at few steps and it has no DPM-Solver, so the
samplers come from diffusers (which drive any eps/v-predicting network).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..errors import DiffusionMICError

BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2", "scaled_linear": "scaled_linear"}
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")   # "sample": the network predicts x_0
SAMPLERS = ("dpm++2m", "ddim", "unipc", "ddpm")


@dataclass(frozen=True)
class NoiseSchedule:
    """The forward process a model was trained with (stored in its card)."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    train_steps: int | None = None   # Fast-DDPM: train only on the timesteps an N-step sampler visits

    def __post_init__(self) -> None:
        if self.beta_schedule not in BETA_SCHEDULES:
            raise DiffusionMICError(f"unknown beta schedule {self.beta_schedule!r}; use one of {sorted(BETA_SCHEDULES)}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise DiffusionMICError(f"unknown prediction type {self.prediction_type!r}; use one of {PREDICTION_TYPES}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "NoiseSchedule":
        return cls(**d)

    @property
    def max_steps(self) -> int:
        """The most sampler steps this schedule can take: every trained timestep once."""
        return self.train_steps or self.num_train_timesteps

    def limit_steps(self, steps: int) -> None:
        """Refuse a step count above `max_steps` with one line naming the maximum."""
        if steps > self.max_steps:
            why = (f"it was trained on {self.train_steps} timesteps only (Fast-DDPM)" if self.train_steps
                   else f"its noise schedule has {self.num_train_timesteps} timesteps")
            raise DiffusionMICError(f"--steps {steps} is too many for this model: {why}; use at most {self.max_steps}")

    def training_timesteps(self):
        """The timesteps training draws from: all of them, or the trailing N-step subset."""
        if self.train_steps is None:
            return torch.arange(self.num_train_timesteps)
        scheduler = self.sampler("ddim")
        scheduler.set_timesteps(self.train_steps)
        return scheduler.timesteps.clone().long()

    def _common(self) -> dict:
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_schedule": BETA_SCHEDULES[self.beta_schedule],
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "prediction_type": self.prediction_type,
        }

    def training_scheduler(self) -> DDPMScheduler:
        """The scheduler used for add_noise / get_velocity during training."""
        return DDPMScheduler(**self._common(), clip_sample=False)

    def sampler(self, name: str) -> SchedulerMixin:
        """A fresh sampling scheduler; all use trailing spacing so few steps start at t = T-1."""
        common = self._common()
        if name == "ddpm":
            return DDPMScheduler(**common, clip_sample=False, timestep_spacing="trailing")
        if name == "ddim":
            return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
        if name == "dpm++2m":
            return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                               timestep_spacing="trailing", final_sigmas_type="zero")
        if name == "unipc":
            return UniPCMultistepScheduler(**common, solver_order=2, timestep_spacing="trailing",
                                           final_sigmas_type="zero")
        raise DiffusionMICError(f"unknown sampler {name!r}; use one of {', '.join(SAMPLERS)}")
