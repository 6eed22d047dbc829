"""Modality conversion: any set of input modalities in, one missing modality out (e.g. T1+T2 -> FLAIR).

The card names them: `inputs` (e.g. ["T1", "T2"]) and `outputs` (e.g. ["FLAIR"]); training settings
choose them with {"task": {"inputs": [...], "output": "..."}} (default T1+T2 -> FLAIR when the data
set has those channels, else every channel but the last -> the last). The model is conditioned by
channel concatenation (network in_channels = 1 + number of inputs).

Training pairs: the inputs come from the data set's images (imagesTr, as a user would give them,
noise included); the target comes from cleanTr when the case has it, else from imagesTr too.
Every channel is normalised on its own: its robust scale (`robust_scale`, the card's percentile of
its Otsu foreground, 99.5 by default) maps to 1.0.

Output: the synthetic modality on the input's exact grid, in the training data's normalised scale
(about [0, 1]: the target's 99.5th foreground percentile is 1.0), 0 outside the inputs' foreground.
`--ensemble N` averages N draws (seeds seed, seed+1, ...); `--strength` has no meaning here and is ignored.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import ndimage

from ..datasets import Case, Dataset
from ..engine.batches import TrainingCase
from ..engine.network import network_config
from ..engine.inference import bounding_box
from ..engine.sampling import sample_draws
from ..engine.space import ModelSpace, foreground, from_unit, robust_scale, to_unit
from ..errors import DiffusionMICError
from ..metrics import image_metrics
from ..models import ModelCard
from ..progress import Progress
from ..volume import Volume
from .base import RunOptions, RunResult, Task

NORMALISATION = {"method": "percentile", "percentile": 99.5, "value": 1.0}
# x0 ("sample") prediction and Fast-DDPM training on the 10 timesteps the default 10-step sampler
# visits (so --steps 1, 2, 5 and 10 all use trained timesteps): on the phantom, 100 training steps
# of the tiny network reach 25.1 dB PSNR this way, 22.5 dB with v prediction (copying T1: 18.7 dB).
SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": "sample", "train_steps": 10}


def input_mask(arrays: np.ndarray) -> np.ndarray:
    """The head/brain region of the inputs: union of their Otsu foregrounds, grown 1 voxel, holes filled."""
    mask = np.zeros(arrays.shape[1:], bool)
    for a in arrays:
        mask |= foreground(a)
    return ndimage.binary_fill_holes(ndimage.binary_dilation(mask))


def normalise(arrays: np.ndarray, normalisation: dict) -> np.ndarray:
    """Each channel of (C, z, y, x) divided by its own robust scale, mapped to [-1, 1]."""
    return np.stack([to_unit(a, robust_scale(a, normalisation)) for a in arrays])


class Translate(Task):
    name = "translate"

    def make_card(self, dataset: Dataset, settings: dict[str, Any]) -> ModelCard:
        spec = settings.get("task", {})
        if {"T1", "T2", "FLAIR"} <= set(dataset.channels):
            inputs, output = ["T1", "T2"], "FLAIR"
        elif len(dataset.channels) >= 2:
            inputs, output = list(dataset.channels[:-1]), dataset.channels[-1]
        else:
            inputs, output = [], ""
        inputs, output = list(spec.get("inputs", inputs)), spec.get("output", output)
        missing = [c for c in [*inputs, output] if c not in dataset.channels]
        if missing or not inputs or not output:
            raise DiffusionMICError(f"translate needs input and output channels of the data set "
                                    f"({', '.join(dataset.channels)}); missing: {', '.join(missing) or 'inputs/output'}")
        if output in inputs:
            raise DiffusionMICError(f"translate: the output {output!r} is also an input")
        return ModelCard(
            name=settings.get("name", f"translate-{'-'.join(inputs)}-to-{output}"), task=self.name,
            inputs=inputs, outputs=[output],
            description=settings.get("description", f"Conditional diffusion: {' + '.join(inputs)} -> {output}."),
            network=network_config(1 + len(inputs), 1, **settings.get("network", {})),
            schedule={**SCHEDULE, **settings.get("schedule", {})},
            normalisation={**NORMALISATION, **settings.get("normalisation", {})},
            patch=settings.get("patch", [64, 64]),
            sampler={"name": "dpm++2m", "steps": 10, **settings.get("sampler", {})},
            defaults={"ensemble": 1, **settings.get("defaults", {})},
            training={"config": settings.get("train", {})},
        )

    def training_cases(self, card: ModelCard, dataset: Dataset, cases: list[Case]) -> list[TrainingCase]:
        out = []
        output = card.outputs[0]
        for case in cases:
            target_variant = "cleanTr" if output in case.variants.get("cleanTr", {}) else None
            volumes = [case.read(ch) for ch in card.inputs] + [case.read(output, target_variant)]
            space = ModelSpace.enter(volumes, card.orientation, card.spacing)
            arrays = normalise(space.arrays, card.normalisation)
            out.append(TrainingCase(target=arrays[-1:], cond=arrays[:-1], foreground=input_mask(space.arrays[:-1])))
        return out

    def run(self, card: ModelCard, network: torch.nn.Module, volumes: list[Volume], options: RunOptions,
            progress: Progress, device: torch.device) -> RunResult:
        if len(volumes) != len(card.inputs):
            raise DiffusionMICError(f"model '{card.name}' translates {' + '.join(card.inputs)} -> {card.outputs[0]}: "
                                    f"it takes {len(card.inputs)} input volume(s) in that order, got {len(volumes)}")
        space = ModelSpace.enter(volumes, card.orientation, card.spacing)
        cond = normalise(space.arrays, card.normalisation)
        mask = input_mask(space.arrays)
        crop = bounding_box(mask)
        progress.start("translate", 0)
        draws = [d[0] for d in sample_draws(card, network, cond, options, device=device, progress=progress, crop=crop)]
        progress.close()
        result = from_unit(np.clip(np.mean(draws, axis=0), -1.0, None), 1.0)
        result[~mask] = 0.0
        out = space.leave(result)
        return RunResult({"output": out.with_array(out.array.astype(np.float32))},
                         {"output_modality": card.outputs[0], "ensemble": options.ensemble})

    def evaluate(self, pred: Volume, ref: Volume, mask: Volume | None) -> dict[str, Any]:
        """NMAE, PSNR and SSIM (and RMSE) inside the mask, both volumes normalised by their own scale.

        The prediction is in the model's normalised scale while a reference is usually in the
        scanner's units, so both are divided by their own robust scale (the 99.5th percentile of
        their Otsu foreground -> 1.0, as in training) before comparing; the JSON says
        "normalised": true. Without a mask the reference's foreground (Otsu, holes filled) is used.
        """
        if mask is None:
            mask = ref.with_array(input_mask(ref.array[None].astype(np.float32)).astype(np.uint8))
        scaled = [v.with_array(v.array.astype(np.float32) / robust_scale(v.array, NORMALISATION))
                  for v in (pred, ref)]
        return {**image_metrics(scaled[0], scaled[1], mask), "normalised": True,
                "normalisation": dict(NORMALISATION)}
