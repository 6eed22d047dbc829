"""Whole-volume sampling every task shares: one model-space array per draw (slices or patches)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch

from ..errors import DiffusionMICError
from ..models import ModelCard
from ..progress import Progress
from .inference import bounding_box, count_batches, count_windows, infer_patches, infer_slices, stack_neighbours
from .network import downsampling_factor
from .sampler import conditioned, sample
from .space import foreground

if TYPE_CHECKING:
    from ..tasks.base import RunOptions

Noise = Callable[[tuple[int, ...], torch.Generator], torch.Tensor]


def select_device(name: str = "auto") -> torch.device:
    """'auto' takes CUDA, then Apple MPS, then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DiffusionMICError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DiffusionMICError("device 'cuda' requested but CUDA is not available")
    return device


def sample_volume(card: ModelCard, network: torch.nn.Module, cond: np.ndarray | None, *, sampler: str,
                  steps: int, generator: torch.Generator, device: torch.device, progress: Progress,
                  start: np.ndarray | None = None, strength: float = 1.0, class_label: int | None = None,
                  guidance: float = 1.0, negative_class: int | None = None, noise: Noise | None = None,
                  batch_size: int = 16,
                  shape: tuple[int, int, int] | None = None, crop: tuple[slice, ...] | None = None) -> np.ndarray:
    """Sample one (C_out, z, y, x) model-space array for a whole volume.

    cond: conditioning channels; start: the image to partially diffuse from (strength < 1);
    both (C, z, y, x) in [-1, 1]; negative_class: what guidance contrasts with (see
    sampler.conditioned). The progress counts sampler steps across all batches.
    """
    out_channels = card.network["out_channels"]
    if cond is not None and card.context:
        cond = stack_neighbours(cond, card.context)
    n_cond = 0 if cond is None else cond.shape[0]
    stacked = [a for a in (cond, start) if a is not None]
    inputs = np.concatenate(stacked) if stacked else None
    shape = shape or tuple(inputs.shape[1:])
    factor = downsampling_factor(card.network)
    null_class = len(card.classes) if card.classes else None

    def predict(x: torch.Tensor | None, out_shape: tuple[int, ...]) -> torch.Tensor:
        c = s = None
        if x is not None:
            x = x.to(device)
            c = x[:, :n_cond] if n_cond else None
            s = x[:, n_cond:] if start is not None else None
        labels = None if class_label is None else torch.full((out_shape[0],), class_label, dtype=torch.long, device=device)
        model = conditioned(network, c, labels, null_class, guidance, negative_class)
        return sample(model, out_shape, card.noise_schedule, sampler=sampler, steps=steps, generator=generator,
                      start=s, strength=strength if s is not None else 1.0,
                      noise=noise(out_shape, generator) if noise is not None else None,
                      device=device, on_step=lambda i, n: progress.advance(), cancel=progress.cancel)

    region = tuple(s.stop - s.start for s in crop) if crop else shape
    steps_per_sample = steps if start is None else max(1, min(steps, round(steps * strength)))
    if card.spatial_dims == 2:
        n = count_batches(region[0], batch_size)
        progress.steps += n * steps_per_sample
        return infer_slices(predict, inputs, out_channels, shape, factor=factor, batch_size=batch_size, crop=crop)
    patch = tuple(card.patch) if card.patch else None
    n = count_windows(region, patch, 0.25) if patch and inputs is not None else 1
    progress.steps += n * steps_per_sample
    return infer_patches(predict, inputs, out_channels, shape, factor=factor, patch=patch, crop=crop)


def sample_draws(card: ModelCard, network: torch.nn.Module, cond: np.ndarray | None, options: "RunOptions", *,
                 device: torch.device, progress: Progress, **kwargs: Any) -> Iterator[np.ndarray]:
    """`options.ensemble` whole-volume draws (seeds seed, seed + 1, ...), one at a time; kwargs go to sample_volume."""
    for k in range(options.ensemble):
        yield sample_volume(card, network, cond, sampler=options.sampler, steps=options.steps,
                            generator=torch.Generator().manual_seed(options.seed + k), device=device,
                            progress=progress, batch_size=options.batch_size, **kwargs)


def foreground_crop(raw: np.ndarray, margin: int = 4) -> tuple[slice, ...]:
    """The bounding box of the Otsu foreground of any channel of raw (C, z, y, x) intensities."""
    return bounding_box(np.logical_or.reduce([foreground(c) for c in raw]), margin)
