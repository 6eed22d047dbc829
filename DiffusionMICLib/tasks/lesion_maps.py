"""Lesion maps, the spatial condition of a generator trained with {"task": {"classes": "lesion",
"lesion_map": true}}: one more UNet input channel holding the lesion fraction of each voxel of
the UNet's grid (a latent model: of each latent voxel), 0 where there is no lesion.

A class added to the time embedding does not draw lesions (measured in the generation study: a
UNet told "healthy" or "lesion" keeps the same share of a noised lesion), so the map says where
they are and how large: the lesion load is the map's volume. At run time the map comes from the
user's lesion mask, or else from the training subjects' maps the card keeps (sparse): one drawn
per seed and mirrored left-right half the time, or, for a lesion load asked in mL, composed of
their lesions.
"""
from __future__ import annotations

import numpy as np
import torch

from ..datasets import Case, Dataset
from ..engine.latent import autoencoder_factor, latent_grid
from ..errors import DiffusionMICError
from ..models import ModelCard
from ..volume import Geometry, Volume, onto_grid
from .from_labels import check_whole_numbers


def on_grid(mask: Volume, grid: Geometry) -> np.ndarray:
    """A 0/1 lesion mask resampled as the images are: lesion fractions."""
    return np.clip(onto_grid(mask.with_array(mask.array.astype(np.float32)), grid), 0.0, 1.0).astype(np.float32)


def case_lesions(dataset: Dataset, case: Case, grid: Geometry) -> np.ndarray:
    """The case's lesion label on `grid` (zeros for a case without labels)."""
    if case.label is None:
        return np.zeros(grid.size[::-1], np.float32)
    labels = case.read_label()
    return on_grid(labels.with_array(labels.array == dataset.labels["lesion"]), grid)


def unet_grid(card: ModelCard, fractions: np.ndarray) -> np.ndarray:
    """Image-grid fractions (z, y, x) -> the (1, *card.patch) condition the UNet takes."""
    t = torch.from_numpy(fractions[None]).float()
    if card.latent:
        t = latent_grid(t, autoencoder_factor(card.latent))
    return t.numpy()


def keep(maps: list[np.ndarray]) -> list[dict[str, list]]:
    """UNet-grid maps -> the card's sparse form (flat indices and values to 3 decimals)."""
    out = []
    for m in maps:
        flat = m.ravel()
        index = np.flatnonzero(flat >= 5e-4)
        out.append({"index": index.tolist(), "value": np.round(flat[index], 3).tolist()})
    return out


def kept(card: ModelCard) -> list[np.ndarray]:
    """The card's training maps, dense (1, *card.patch)."""
    maps = card.training.get("lesion_maps") or []
    if not maps:
        raise DiffusionMICError(f"model '{card.name}' keeps no training lesion maps: give a lesion mask as input")
    out = []
    for m in maps:
        dense = np.zeros((1, *card.patch), np.float32)
        dense.reshape(-1)[np.asarray(m["index"], np.int64)] = m["value"]
        out.append(dense)
    return out


def drawn(card: ModelCard, seed: int) -> np.ndarray:
    """One of the card's training maps, chosen and mirrored (half the time) by `seed`."""
    maps = kept(card)
    rng = np.random.default_rng(seed)
    chosen = maps[int(rng.integers(len(maps)))]
    return chosen[..., ::-1].copy() if rng.random() < 0.5 else chosen


LOAD_TOLERANCE = 0.25     # a composed map's load is within this fraction of the one asked for
LOAD_TRIES = 16           # orders of the training lesions tried before giving up


def composed(card: ModelCard, seed: int, load: float) -> np.ndarray:
    """A map of about `load` mL: the training maps' lesions (their connected components, each at the
    place it had, mirrored left-right half the time) taken in an order drawn by `seed`, each kept
    if it brings the total nearer the load without passing its tolerance; further orders are tried
    until one lands within it. One line if none does."""
    from scipy import ndimage
    lesions = []
    for m in kept(card):
        components, n = ndimage.label(m > 0)
        lesions += [np.where(components == k, m, 0.0).astype(np.float32) for k in range(1, n + 1)]
    rng = np.random.default_rng(seed)
    for _ in range(LOAD_TRIES):
        out, current = np.zeros((1, *card.patch), np.float32), 0.0
        for i in rng.permutation(len(lesions)):
            lesion = lesions[i][..., ::-1] if rng.random() < 0.5 else lesions[i]
            trial = np.maximum(out, lesion)
            total = load_ml(card, trial)
            if total <= load * (1 + LOAD_TOLERANCE) and abs(total - load) < abs(current - load):
                out, current = trial, total
        if abs(current - load) <= LOAD_TOLERANCE * load:
            return np.ascontiguousarray(out)
    sizes = [load_ml(card, x) for x in lesions]
    raise DiffusionMICError(f"--lesion-load {load:g} mL cannot be composed within {LOAD_TOLERANCE:.0%} from model "
                            f"'{card.name}'s training lesions ({min(sizes):.2g} mL the smallest, "
                            f"{load_ml(card, np.max(lesions, axis=0)):.3g} mL all together)")


def from_mask(card: ModelCard, volume: Volume) -> np.ndarray:
    """The user's lesion mask (non-zero = lesion; or a label map holding the training data's lesion
    label) as the UNet's condition; one clear line for an intensity image or an empty mask."""
    check_whole_numbers(volume, card, "takes a lesion mask")
    a = volume.array
    value = card.training.get("lesion_label")
    found = set(np.unique(a).tolist()) - {0}
    if len(found) > 1:
        if value not in found:
            raise DiffusionMICError(f"the lesion mask holds several labels ({', '.join(str(int(v)) for v in sorted(found)[:8])}) "
                                    f"but not the lesion label {value}: give a mask whose non-zero voxels are lesion")
        lesion = a == value
    else:
        lesion = a != 0
    if not lesion.any():
        raise DiffusionMICError("the lesion mask is empty: it marks no lesion (draw a healthy sample with "
                                "--condition healthy)")
    grid = Geometry.from_dict(card.grid)
    cond = unet_grid(card, on_grid(volume.with_array(lesion), grid))
    if not cond.any():
        raise DiffusionMICError("the lesion mask lies outside the model's output grid")
    return cond


def load_ml(card: ModelCard, cond: np.ndarray) -> float:
    """The lesion load a condition asks for, in mL."""
    spacing = np.asarray(card.spacing, float) * (autoencoder_factor(card.latent) if card.latent else 1)
    return round(float(cond.sum() * np.prod(spacing) / 1000.0), 3)
