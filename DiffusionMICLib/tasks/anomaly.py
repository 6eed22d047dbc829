"""Anomaly detection by reconstruction (AnoDDPM): diffuse the input part way, let a model of
healthy anatomy denoise it back, and call anomalous what it had to change.

Model: an unconditional 2D (axial slice) diffusion model of healthy images. `card.inputs` lists
the modalities it models *jointly* as channels (settings {"task": {"channels": [...]}}; default
["FLAIR"] when the data set has it, where MS-like lesions are brightest, else its first channel);
a run takes one input volume per channel, in that order, on one grid. Each channel is scaled on
its own: the median of its Otsu foreground maps to 0.5 (as for denoise: robust to lesions and noise).

Training data, healthy only: a case's `healthyTr` images when the data set has them (the
phantom), else the cases whose label map holds no voxel of an abnormal label (the phantom's label
names: "lesion", "iso-lesion", "hypo-lesion", "tumour", "oedema", "necrosis"; a data set without
such a label is taken as all healthy). Training noise and the initial noise of a run are
multi-octave simplex noise (`engine.simplex`) as in AnoDDPM; {"task": {"noise": {"type":
"gaussian"}}} switches both to Gaussian (card.defaults["noise"]).

Run: noise the input to depth `--strength` (card default 0.3 of the schedule; 0.5 for a masked
model), reconstruct with the sampler, anomaly map = mean over channels of |input -
reconstruction| (normalised units), Gaussian-smoothed (card.defaults["smooth_mm"], sigma in mm),
averaged over `--ensemble` draws (seeds seed, seed+1, ...) and set to 0 outside the input's
foreground (Otsu union over channels, holes filled, eroded by card.defaults["erode_mm"] = 2 mm:
the brain's outer edge is where a reconstruction errs most on healthy tissue). Outputs on the
input's exact grid: "output" the map (float32) and "mask" (uint8) = map >
card.defaults["threshold"] (a model without one uses median + 5 MAD of its own map).
RunResult.info["score"] is the mean of the top 0.1 % of map values inside the foreground
(card.defaults["top_fraction"]: lesions are ~0.1 % of a brain, and top 0.1 % separated healthy
from lesioned phantom subjects better than top 1 %); info["anomalous"] says whether it exceeds
card.defaults["score_threshold"]. `detect` makes the same map, mask and score from any
reconstruction (the study's autoencoder baselines use it).

Masked reconstruction ({"task": {"masked": {"box": B}}}, after pDDPM, Behrendt et al. 2023): the
model also sees the clean image with a checkerboard of B x B boxes blanked (every other box in y
and x, random offset; blanked to 0 in [-1, 1] units) and the box mask, and learns to restore the
whole slice; the blanked boxes can only come from their healthy surroundings. A run makes four
passes whose boxes together cover each voxel once and keeps each pass's reconstruction inside
its boxes, so a lesion is redrawn from the tissue around it, not from itself: four times the
cost of the plain reconstruction.

Thresholds (calibrated after training, `calibrate`): the voxel threshold is the 99.9th
percentile (card.defaults["threshold_percentile"]) of the map over healthy foreground voxels of
up to two training cases' *acquired* images (imagesTr: real noise; lesion voxels, grown by 2
voxels, are left out), made with the card's default strength, sampler, steps and ensemble; the
score threshold is the largest healthy score seen there. Those subjects' healthy versions were
trained on, so the thresholds are slightly optimistic; a fixed {"task": {"threshold": T}} in
the settings skips the voxel calibration. Both hold for the default strength/ensemble only.

Evaluation (`evaluate`, metrics.detection_metrics): the reference lesion is a binary mask's
foreground, or the abnormal labels (>= 4) of a phantom label map (values 0-9); without --mask the
voxels scored are those where the map is defined plus the reference lesions.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np
import torch
from scipy import ndimage

from ..datasets import Case, Dataset
from ..engine.batches import TrainingCase
from ..engine.inference import bounding_box
from ..engine.network import network_config
from ..engine.sampling import sample_draws, sample_volume
from ..engine.simplex import DEFAULTS as SIMPLEX_DEFAULTS
from ..engine.simplex import noise_from_spec
from ..engine.trainer import Batch
from ..engine.space import ModelSpace, foreground, robust_scale, to_unit
from ..errors import DiffusionMICError
from ..metrics import detection_metrics
from ..models import ModelCard
from ..phantom import ANOMALIES
from ..progress import Progress
from ..volume import Volume
from .base import RunOptions, RunResult, Task

NORMALISATION = {"method": "percentile", "percentile": 50, "value": 0.5}
PHANTOM_LESION = 4     # the phantom's (and DESIGN.md's) label value of "lesion"; abnormal tissue >= 4

# reconstruct(x, crop) -> the reconstructions (draws) of x, (C, z, y, x) normalised, each (C, z, y, x)
Reconstruct = Callable[[np.ndarray, tuple[slice, ...]], Iterable[np.ndarray]]


def checker(shape: tuple[int, int], box: int, offset: tuple[int, int]) -> np.ndarray:
    """(y, x) bool: every other `box` x `box` square in y and in x, shifted by `offset` voxels.
    Offsets (0, 0), (box, 0), (0, box), (box, box) cover every voxel exactly once."""
    y = ((np.arange(shape[0]) + offset[0]) // box) % 2 == 0
    x = ((np.arange(shape[1]) + offset[1]) // box) % 2 == 0
    return y[:, None] & x[None, :]


def blanked(x: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """The conditioning of a masked model: x (C, ..., y, x) with `boxes` set to 0, and the mask in {-1, 1}."""
    mask = np.broadcast_to(boxes, x.shape[1:])
    return np.concatenate([np.where(mask, 0.0, x), (mask * 2.0 - 1.0)[None]]).astype(np.float32)


def brain_mask(arrays: np.ndarray) -> np.ndarray:
    """The union of the channels' Otsu foregrounds, holes filled (ventricles dark on FLAIR/T1)."""
    mask = np.zeros(arrays.shape[1:], bool)
    for a in arrays:
        mask |= foreground(a)
    return ndimage.binary_fill_holes(mask)


TOP_FRACTION = 0.001    # the volume score by default: the mean of the map's top 0.1 % in the brain


def top_mean(values: np.ndarray, fraction: float) -> float:
    """Mean of the largest `fraction` of values (at least one)."""
    if values.size == 0:
        return 0.0
    k = max(1, int(round(values.size * fraction)))
    return float(np.mean(np.partition(values.ravel(), values.size - k)[-k:]))


def lesion_reference(ref: Volume) -> np.ndarray:
    """The reference lesion mask: a binary map as it is; a phantom label map: its abnormal labels (>= 4)."""
    values = set(np.unique(ref.array).tolist())
    if values <= {0, 1}:
        return ref.array > 0
    if values <= set(range(max(v for v, _ in ANOMALIES.values()) + 1)):
        return ref.array >= PHANTOM_LESION
    raise DiffusionMICError(f"the reference holds labels {sorted(values)[:8]}: give a binary lesion mask "
                            f"(or a phantom label map, abnormal labels {PHANTOM_LESION} and above)")


class Anomaly(Task):
    name = "anomaly"

    def make_card(self, dataset: Dataset, settings: dict[str, Any]) -> ModelCard:
        spec = settings.get("task", {})
        default = ["FLAIR"] if "FLAIR" in dataset.channels else dataset.channels[:1]
        channels = list(spec.get("channels", default))
        missing = [c for c in channels if c not in dataset.channels]
        if missing or not channels:
            raise DiffusionMICError(f"anomaly: channels {', '.join(missing) or '(none)'} are not in the data set "
                                    f"({', '.join(dataset.channels)})")
        noise = dict(spec.get("noise", {"type": "simplex", **SIMPLEX_DEFAULTS}))
        noise_from_spec(noise)   # reject a bad spec before training
        masked = spec.get("masked")
        if masked is not None and not (isinstance(masked, dict) and int(masked.get("box", 0)) >= 2):
            raise DiffusionMICError(f"anomaly: 'masked' takes {{\"box\": B}} with B >= 2 voxels, got {masked!r}")
        n = len(channels)
        defaults = {"strength": 0.5 if masked else 0.3, "ensemble": 1, "noise": noise, "smooth_mm": 2.0,
                    "erode_mm": 2.0,
                    "top_fraction": TOP_FRACTION,
                    "threshold_percentile": 99.9, "threshold": spec.get("threshold"), "score_threshold": None,
                    "threshold_source": "settings" if spec.get("threshold") is not None else None,
                    "masked": {"box": int(masked["box"])} if masked else None}
        return ModelCard(
            name=settings.get("name", f"anomaly-{'-'.join(channels)}"), task=self.name,
            inputs=channels, outputs=["anomaly"],
            description=settings.get("description", f"AnoDDPM-style reconstruction model of healthy "
                                                    f"{' + '.join(channels)} ({noise['type']} noise)."),
            network=network_config(2 * n + 1 if masked else n, n, **settings.get("network", {})),
            schedule={"num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": "epsilon",
                      **settings.get("schedule", {})},
            normalisation={**NORMALISATION, **settings.get("normalisation", {})},
            patch=settings.get("patch", [64, 64]),
            sampler={"name": "ddim", "steps": 10, **settings.get("sampler", {})},
            defaults={**defaults, **settings.get("defaults", {})},
            training={"config": settings.get("train", {})},
        )

    # ---- training ---------------------------------------------------------------------------
    @staticmethod
    def _lesion_values(dataset: Dataset) -> list[int] | None:
        """The data set's abnormal label values (named as the phantom names them), or None."""
        return [v for name, v in dataset.labels.items() if name in ANOMALIES] or None

    def _healthy_source(self, case: Case, channels: list[str], lesion: list[int] | None) -> str | None:
        """'healthyTr' or 'imagesTr' if this case gives healthy images of all channels, else None."""
        if all(ch in case.variants.get("healthyTr", {}) for ch in channels):
            return "healthyTr"
        if lesion is None or case.label is None:
            return "imagesTr" if lesion is None else None
        return None if np.any(np.isin(case.read_label().array, lesion)) else "imagesTr"

    def training_cases(self, card: ModelCard, dataset: Dataset, cases: list[Case]) -> list[TrainingCase]:
        lesion = self._lesion_values(dataset)
        out = []
        for case in cases:
            source = self._healthy_source(case, card.inputs, lesion)
            if source is None:
                continue
            variant = None if source == "imagesTr" else source
            space = ModelSpace.enter([case.read(ch, variant) for ch in card.inputs], card.orientation, card.spacing)
            arrays = np.stack([to_unit(a, robust_scale(a, card.normalisation)) for a in space.arrays])
            out.append(TrainingCase(target=arrays, foreground=brain_mask(space.arrays)))
        if not out:
            raise DiffusionMICError("anomaly training needs healthy data: no case has healthyTr images "
                                    "or a label map without lesions")
        return out

    def training_noise(self, card: ModelCard, device: torch.device):
        return noise_from_spec(card.defaults.get("noise"), device)

    def augment(self, card: ModelCard):
        """A masked model's conditioning: each crop blanked in a checkerboard of boxes at a random offset."""
        masked = card.defaults.get("masked")
        if not masked:
            return None
        box = int(masked["box"])

        def blank(batch: Batch, generator: torch.Generator) -> Batch:
            offsets = torch.randint(0, 2 * box, (batch.target.shape[0], 2), generator=generator).tolist()
            target = batch.target.numpy()
            cond = np.stack([blanked(t, checker(t.shape[-2:], box, o)) for t, o in zip(target, offsets)])
            return Batch(batch.target, torch.from_numpy(cond), batch.labels)
        return blank

    # ---- the anomaly map --------------------------------------------------------------------
    @staticmethod
    def diffusion_reconstruction(card: ModelCard, network: torch.nn.Module, options: RunOptions,
                                 progress: Progress, device: torch.device) -> Reconstruct:
        """The AnoDDPM reconstruction: `options.ensemble` draws of partial diffusion and sampling;
        for a masked model, each draw assembled from four passes with complementary boxes blanked."""
        noise = noise_from_spec(card.defaults.get("noise"), device)
        masked = card.defaults.get("masked")
        if not masked:
            return lambda x, crop: sample_draws(card, network, None, options, device=device, progress=progress,
                                                crop=crop, start=x, strength=options.strength, noise=noise)
        box = int(masked["box"])

        def reconstruct(x: np.ndarray, crop: tuple[slice, ...]) -> Iterable[np.ndarray]:
            inside = np.zeros(x.shape[1:], bool)
            inside[crop] = True
            for k in range(options.ensemble):
                out = x.copy()
                for offset in ((0, 0), (box, 0), (0, box), (box, box)):
                    boxes = np.broadcast_to(checker(x.shape[-2:], box, offset), x.shape[1:]) & inside
                    r = sample_volume(card, network, blanked(x, boxes), sampler=options.sampler, steps=options.steps,
                                      generator=torch.Generator().manual_seed(options.seed + k), device=device,
                                      progress=progress, start=x, strength=options.strength, noise=noise,
                                      batch_size=options.batch_size, crop=crop)
                    out[:, boxes] = r[:, boxes]
                yield out
        return reconstruct

    @staticmethod
    def anomaly_map(card: ModelCard, space: ModelSpace, reconstruct: Reconstruct) -> tuple[np.ndarray, np.ndarray]:
        """(map, foreground) on the model grid, (z, y, x): the mean over the reconstructions of
        |input - reconstruction| (normalised units, averaged over channels), smoothed and masked."""
        x = np.stack([to_unit(a, robust_scale(a, card.normalisation)) for a in space.arrays])
        mask = brain_mask(space.arrays)
        crop = bounding_box(mask, margin=4)
        erode = int(round(float(card.defaults.get("erode_mm", 0.0)) / min(space.model_grid.spacing)))
        if erode > 0:   # border_value=1: a cropped input's brain goes on beyond the array's edge
            mask = ndimage.binary_erosion(mask, iterations=erode, border_value=1)
        sigma = [float(card.defaults.get("smooth_mm", 2.0)) / s for s in space.model_grid.spacing[::-1]]
        total = np.zeros(mask.shape, np.float32)
        draws = 0
        for recon in reconstruct(x, crop):
            diff = np.abs(x - recon).mean(axis=0)
            total += ndimage.gaussian_filter(diff, sigma) if max(sigma) > 0 else diff
            draws += 1
        amap = total / max(draws, 1)
        amap[~mask] = 0.0
        return amap.astype(np.float32), mask

    def run(self, card: ModelCard, network: torch.nn.Module, volumes: list[Volume], options: RunOptions,
            progress: Progress, device: torch.device) -> RunResult:
        reconstruct = self.diffusion_reconstruction(card, network, options, progress, device)
        return self.detect(card, volumes, reconstruct, progress,
                           {"strength": options.strength, "ensemble": options.ensemble,
                            "noise": (card.defaults.get("noise") or {}).get("type", "gaussian")})

    def detect(self, card: ModelCard, volumes: list[Volume], reconstruct: Reconstruct, progress: Progress,
               details: dict[str, Any] | None = None) -> RunResult:
        """Map, mask and score of input volumes on their exact grid, from any reconstruction of
        them in the card's normalised units (the diffusion model's, or a baseline's)."""
        if len(volumes) != len(card.inputs):
            raise DiffusionMICError(f"model '{card.name}' models {' + '.join(card.inputs)}: it takes "
                                    f"{len(card.inputs)} input volume(s) in that order, got {len(volumes)}")
        space = ModelSpace.enter(volumes, card.orientation, card.spacing)
        progress.start("anomaly", 0)
        amap, mask = self.anomaly_map(card, space, reconstruct)
        progress.close()
        d = card.defaults
        score = top_mean(amap[mask], float(d.get("top_fraction", TOP_FRACTION)))
        out = space.leave(amap)
        out = out.with_array(np.clip(out.array, 0.0, None).astype(np.float32))
        threshold = d.get("threshold")
        if threshold is None:     # an uncalibrated model: a robust outlier level of this volume
            vals = amap[mask]
            threshold = float(np.median(vals) + 5 * 1.4826 * np.median(np.abs(vals - np.median(vals))))
        info: dict[str, Any] = {"score": score, "threshold": float(threshold), **(details or {})}
        binary = out.array > threshold
        info["mask_voxels"] = int(binary.sum())
        info["mask_ml"] = round(float(binary.sum() * np.prod(out.spacing)) / 1000.0, 3)
        if d.get("score_threshold") is not None:
            info["anomalous"] = bool(score > d["score_threshold"])
        return RunResult({"output": out, "mask": out.with_array(binary.astype(np.uint8))}, info)

    # ---- thresholds after training ----------------------------------------------------------
    def calibrate(self, card: ModelCard, network: torch.nn.Module, dataset: Dataset, cases: list,
                  device: torch.device, progress: Progress) -> None:
        lesion = self._lesion_values(dataset)
        network.eval()
        options = RunOptions(seed=12345).with_card_defaults(card)
        d = card.defaults
        reconstruct = self.diffusion_reconstruction(card, network, options, progress, device)
        values, scores, used = [], [], []
        progress.start("calibrate", 0)
        for case in cases[: int(d.get("calibration_cases", 2))]:
            volumes = [case.read(ch) for ch in card.inputs]
            lesions = None
            if lesion is not None and case.label is not None:
                ref = case.read_label()
                lesions = ref.with_array(np.isin(ref.array, lesion).astype(np.float32))
            space = ModelSpace.enter(volumes + ([lesions] if lesions is not None else []),
                                     card.orientation, card.spacing)
            images = ModelSpace(space.arrays[: len(volumes)], space.reference, space.model_grid)
            amap, mask = self.anomaly_map(card, images, reconstruct)
            healthy = mask.copy()
            if lesions is not None:
                healthy &= ~ndimage.binary_dilation(space.arrays[-1] > 0.1, iterations=2)
            values.append(amap[healthy])
            scores.append(top_mean(amap[healthy], float(d.get("top_fraction", TOP_FRACTION))))
            used.append(case.id)
        progress.close()
        if not used:
            return
        pooled = np.concatenate(values)
        if d.get("threshold_source") != "settings":     # (re)calibrated, also after fine-tuning
            d["threshold"] = float(np.percentile(pooled, float(d.get("threshold_percentile", 99.9))))
            d["threshold_source"] = "calibration"
        d["score_threshold"] = float(max(scores))
        d["calibration"] = {"cases": used, "healthy_voxels": int(pooled.size), "healthy_scores": scores,
                            "strength": options.strength, "ensemble": options.ensemble,
                            "sampler": options.sampler, "steps": options.steps}

    # ---- evaluation -------------------------------------------------------------------------
    def evaluate(self, pred: Volume, ref: Volume, mask: Volume | None) -> dict[str, Any]:
        return self.evaluate_many([pred], [ref], [mask] if mask is not None else None)

    def evaluate_many(self, preds: list[Volume], refs: list[Volume], masks: list[Volume] | None) -> dict[str, Any]:
        """Voxel AUROC/AUPRC/best Dice pooled over the volumes, and volume-level AUROC of the scores.

        The reference lesion is a binary map's foreground or a phantom label map's abnormal labels (>= 4).
        Without a mask, a volume's voxels are those where the map is defined (> 0) plus its lesions.
        """
        if len(preds) != len(refs):
            raise DiffusionMICError(f"give as many --ref as --pred ({len(refs)} vs {len(preds)})")
        lesions = [r.with_array(lesion_reference(r).astype(np.uint8)) for r in refs]
        if masks is None:
            masks = [p.with_array(((p.array > 0) | (les.array > 0)).astype(np.uint8))
                     for p, les in zip(preds, lesions)]
        return detection_metrics(preds, lesions, masks)
