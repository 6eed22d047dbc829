"""Generation from a label map (mask conditioning, as MAISI and ControlNet do): multi-contrast
images that match a given tissue label map — the phantom's, or a segmentation drawn in Slicer —
e.g. paired synthetic images with labels for training other models.

Training settings {"task": {"from_labels": true, "channels": [...]}} (default: every channel of
the data set; "variant": e.g. "cleanTr", default imagesTr as acquired, noise included;
"oversample": the fraction of crops centred on a labelled voxel, default 2/3, the rest anywhere,
so that background-only slices are learned too). The model
is a 2D slice model, like translate's: conditioned by channel concatenation on the one-hot label
map (one channel per label of dataset.json, background included, in {-1, 1}) of the slice and of
`context` slices each side (default 1); each generated channel normalised on its own (its 99.5th
foreground percentile -> 1.0). The card's `inputs` is ["labels"] and its `labels` the names and
values it knows.

Run (`run generate --model M --input LABELS`): the label map must hold whole-number labels the card
knows. Outputs as for unconditional generation ("output", "2", ... per sample; the channel name
appended for the second, third channel), on the label map's exact grid, in the training data's
normalised scale.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..datasets import Case, Dataset
from ..engine.batches import TrainingCase
from ..engine.network import network_config
from ..engine.sampling import sample_volume
from ..engine.space import ModelSpace, from_unit
from ..errors import DiffusionMICError
from ..models import LABEL_INPUT, ModelCard
from ..progress import Progress
from ..volume import Volume
from .base import RunOptions
from .segment import case_labels, dataset_labels, on_model_grid, one_hot
from .translate import NORMALISATION, SCHEDULE, normalise

OVERSAMPLE = 2 / 3     # the fraction of training crops centred on a labelled voxel; the rest anywhere


def make_card(dataset: Dataset, settings: dict[str, Any]) -> ModelCard:
    spec = settings.get("task", {})
    channels = list(spec.get("channels", dataset.channels))
    missing = [c for c in channels if c not in dataset.channels]
    if missing or not channels:
        raise DiffusionMICError(f"generate: channels {', '.join(missing) or '(none)'} are not in the data set "
                                f"({', '.join(dataset.channels)})")
    labels = dataset_labels(dataset, "generation from labels")
    context = int(settings.get("context", 1))
    return ModelCard(
        name=settings.get("name", f"generate-{'-'.join(channels)}-from-labels"), task="generate",
        inputs=[LABEL_INPUT], outputs=channels,
        description=settings.get("description", f"{' + '.join(channels)} drawn to match a label map "
                                                f"({', '.join(labels)})."),
        network=network_config(len(channels) + len(labels) * (2 * context + 1), len(channels),
                               **settings.get("network", {})),
        schedule={**SCHEDULE, **settings.get("schedule", {})},
        normalisation={**NORMALISATION, **settings.get("normalisation", {})},
        labels=labels, patch=settings.get("patch", [64, 64]), context=context,
        sampler={"name": "dpm++2m", "steps": 10, **settings.get("sampler", {})},
        defaults=dict(settings.get("defaults", {})),
        training={"config": settings.get("train", {}), "variant": spec.get("variant"),
                  "oversample": float(spec.get("oversample", OVERSAMPLE))},
    )


def training_cases(card: ModelCard, dataset: Dataset, cases: list[Case]) -> list[TrainingCase]:
    values = list(card.labels.values())
    variant = card.training.get("variant")
    out = []
    for case in cases:
        images = [case.read(ch, variant) for ch in card.outputs]
        space = ModelSpace.enter(images, card.orientation, card.spacing)
        lab = case_labels(case, images, space, "generation from labels")
        # Crops centred anywhere (foreground=None), `oversample` of them on a labelled voxel: a label map
        # also holds slices of background only, which a model trained on brain-centred crops filled with tissue.
        out.append(TrainingCase(target=normalise(space.arrays, card.normalisation), cond=one_hot(lab, values),
                                focus=[np.argwhere(lab > 0)]))
    return out


def check_whole_numbers(volume: Volume, card: ModelCard, takes: str) -> None:
    """One clear line for an intensity image where the model `takes` labels."""
    a = volume.array
    if not np.issubdtype(a.dtype, np.integer) and not np.array_equal(a, np.rint(a)):
        raise DiffusionMICError(f"model '{card.name}' {takes} (whole-number labels); "
                                f"the input holds fractional values: an intensity image?")


def check_label_map(volume: Volume, card: ModelCard) -> None:
    """One clear line for an intensity image or labels the model does not know."""
    check_whole_numbers(volume, card, "generates from a label map")
    found = np.unique(volume.array).astype(np.int64)
    unknown = sorted(set(found.tolist()) - set(card.labels.values()))
    if unknown:
        shown = ", ".join(str(v) for v in unknown[:8]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 8 else "")
        known = ", ".join(f"{name} = {v}" for name, v in card.labels.items())
        raise DiffusionMICError(f"the label map holds labels model '{card.name}' does not know: {shown} "
                                f"(it knows {known})")


def samples(card: ModelCard, network: torch.nn.Module, volumes: list[Volume], options: RunOptions,
            progress: Progress, device: torch.device) -> list[list[Volume]]:
    """`options.count` samples (seeds seed, seed + 1, ...), each a volume per output channel on the
    label map's grid."""
    if len(volumes) != 1:
        raise DiffusionMICError(f"model '{card.name}' generates from a label map: it takes one input "
                                f"(the label map), got {len(volumes)}")
    label = volumes[0]
    check_label_map(label, card)
    space = ModelSpace.enter([label.with_array(label.array.astype(np.float32))], card.orientation, card.spacing)
    lab = on_model_grid(label, space)
    if not np.any(lab > 0):
        raise DiffusionMICError("the label map is empty: it holds no label but background")
    cond = one_hot(lab, list(card.labels.values()))
    out = []
    for i in range(options.count):
        x = sample_volume(card, network, cond, sampler=options.sampler, steps=options.steps,
                          generator=torch.Generator().manual_seed(options.seed + i), device=device,
                          progress=progress, batch_size=options.batch_size)     # the whole grid: background too
        out.append([space.leave(from_unit(np.clip(c, -1.0, None), 1.0).astype(np.float32)) for c in x])
    return out
