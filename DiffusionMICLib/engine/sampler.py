"""The reverse process: full or partial (from a given image) sampling with any scheduler."""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import Cancelled, DiffusionMICError
from .schedule import NoiseSchedule

# model(x_t, t) -> the network's prediction (epsilon or v), conditioning already bound.
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, int], None]


def conditioned(network: torch.nn.Module, cond: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None, null_class: int | None = None,
                guidance: float = 1.0, negative_class: int | None = None) -> Denoiser:
    """Bind channel-concatenated conditioning and class labels (with classifier-free guidance).

    With guidance g != 1 the prediction is uncond + g * (cond - uncond), where uncond uses the
    reserved null class; this is linear, so it is right for both epsilon and v prediction. With
    `negative_class`, uncond is that class on all-zero conditioning channels instead (a negative
    condition, as a negative prompt replaces the empty one in Stable Diffusion pipelines).
    """
    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        inp = x if cond is None else torch.cat([x, cond.to(x.dtype)], dim=1)
        tt = t.expand(x.shape[0]) if t.ndim else t.repeat(x.shape[0])
        if class_labels is None:
            return network(inp, tt)
        out = network(inp, tt, class_labels=class_labels)
        if guidance == 1.0 or (null_class is None and negative_class is None):
            return out
        if negative_class is not None:
            empty = x if cond is None else torch.cat([x, torch.zeros_like(cond, dtype=x.dtype)], dim=1)
            uncond = network(empty, tt, class_labels=torch.full_like(class_labels, negative_class))
        else:
            uncond = network(inp, tt, class_labels=torch.full_like(class_labels, null_class))
        return uncond + guidance * (out - uncond)
    return predict


@torch.no_grad()
def sample(model: Denoiser, shape: tuple[int, ...], schedule: NoiseSchedule, *,
           sampler: str = "dpm++2m", steps: int = 20, generator: torch.Generator | None = None,
           start: torch.Tensor | None = None, strength: float = 1.0, noise: torch.Tensor | None = None,
           device: torch.device | str = "cpu", on_step: StepCallback | None = None,
           cancel: Callable[[], bool] | None = None) -> torch.Tensor:
    """Run the reverse process and return x_0.

    start/strength: partial diffusion (SDEdit/AnoDDPM): noise `start` to the timestep at
    `strength` (0..1 of the schedule) and denoise from there, taking about strength*steps steps.
    noise: the initial noise (e.g. simplex); Gaussian from `generator` on the CPU otherwise,
    so results are the same on every device for a given seed.
    """
    if steps < 1:
        raise DiffusionMICError(f"steps must be at least 1, got {steps}")
    if not 0.0 < strength <= 1.0:
        raise DiffusionMICError(f"strength must be in (0, 1], got {strength}")
    scheduler = schedule.sampler(sampler)
    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps
    if noise is None:
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    noise = noise.to(device)
    if start is None:
        x = noise * scheduler.init_noise_sigma
    else:
        order = getattr(scheduler, "order", 1)
        skip = steps - max(1, min(steps, round(steps * strength)))
        timesteps = timesteps[skip * order:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(skip * order)
        x = scheduler.add_noise(start.to(device), noise, timesteps[:1])
    step_kwargs = {"generator": generator} if sampler == "ddpm" else {}
    total = len(timesteps)
    for i, t in enumerate(timesteps):
        if cancel is not None and cancel():
            raise Cancelled("cancelled")
        x_in = scheduler.scale_model_input(x, t)
        pred = model(x_in, t.to(device)).float()
        if sampler == "ddpm":
            # DDPM's variance noise must come from the CPU generator for device-independence.
            x = scheduler.step(pred.cpu(), t.cpu(), x.cpu(), **step_kwargs).prev_sample.to(device)
        else:
            x = scheduler.step(pred, t, x).prev_sample
        if on_step is not None:
            on_step(i + 1, total)
    return x
