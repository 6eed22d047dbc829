"""Generation: sample new whole-brain volumes, unconditional or class-conditional with
classifier-free guidance; or images that match a given label map ({"task": {"from_labels":
true}}: a slice model conditioned on the labels, see from_labels.py).

Scheme: a 3D diffusion UNet over the *whole* volume on a coarse grid (default 4 mm isotropic),
so a sample is coherent across slices by construction and cheap enough for a CPU (a 2 mm
phantom box of 80 x 104 x 88 voxels becomes 40 x 52 x 44). The grid (`card.grid`: size,
spacing, origin, direction) is the first training case's box in RAS orientation, resampled to
{"task": {"spacing": [x, y, z]}} mm and padded evenly to a multiple of the UNet's downsampling
factor; every training image is resampled onto it (Gaussian pre-filter against aliasing, then
linear), so the data set's subjects must roughly share a field of view (the phantom does;
register real data to a template first). Training crops are the whole grid (no random crop),
with random left-right flips as the only augmentation. Default network: channels [32, 64, 64],
no attention, batch 4 — meant for a GPU; on a CPU use an 8 mm grid and channels [16, 32]
(about 0.2-0.5 s a step here) with x0 prediction and Fast-DDPM ({"schedule": {"train_steps":
10, "prediction_type": "sample"}}), which learn the brain's shape within a few hundred steps.

Latent diffusion ({"autoencoder": {...}} in the training settings; engine/latent.py): the UNet
learns the latents of a MONAI AutoencoderKL trained first on crops of the same volumes, so a
2 mm grid costs the UNet what a 4 mm one costs in image space; card.patch is then the latent
shape, and sampling decodes the drawn latent onto the grid.

Channels and classes ({"task": {...}} in the training settings):
- "channels": modalities generated *jointly*, one UNet channel each (default: the data set's
  first channel). Every channel is scaled on its own: its 99.5th Otsu-foreground percentile is 1.0.
- "classes": null (unconditional), "lesion" (classes ["healthy", "lesion"]: a case is "lesion"
  when its label map holds the label named "lesion"; a case's healthyTr images, when the data
  set has them, add a "healthy" example), or "modality" (classes = the channels: one
  single-channel model that generates the modality `--condition` names).
  The trainer drops the class to a null class 15 % of the time, so `--guidance G` gives
  classifier-free guidance; without `--condition` a class-conditional model samples the null
  (unconditional) class.
- "variant": which images to learn from: null (imagesTr, noise included) or e.g. "cleanTr".
- "lesion_weight": w > 0 weights the loss 1 + w on the voxels of each case's lesions (and
  their Gaussian-prefiltered rim on the grid; a latent model: the latent voxels over them), in
  its lesion example and its healthy twin alike: lesions fill a few per mille of the brain, so a
  plain loss learns anatomy and leaves them out. Needs classes "lesion".
- "lesion_map": true gives the UNet a lesion map as one more input channel (lesion_maps.py): the
  lesion example gets its lesion label's fraction per voxel, its healthy twin zeros. `run
  --condition lesion` then takes a lesion mask as input (its volume is the lesion load) or draws
  one of the training subjects' maps, which the card keeps. `--guidance G` then contrasts a
  lesion sample with a healthy one on an empty map (a negative condition, not the null class):
  G > 1 draws its lesions brighter. Needs classes "lesion".

Run (`run generate`, no input; a lesion-map model: an optional lesion mask): `--count N` samples with seeds seed, seed+1, ...; output keys
"output" (sample 1), "2", "3", ... (sample 2, 3, ...), and for a second, third channel the
channel name is appended ("T2", "2-T2"), which the CLI writes as OUT, OUT-2, OUT-T2, OUT-2-T2
beside --output. Values are in the training data's normalised scale (about [0, 1.2]: each
channel's 99.5th foreground percentile is 1.0), on the card's grid.

Evaluation (`generation_metrics`): what a generator can be judged on without downloaded
networks — foreground intensity quantiles and 1D Wasserstein distance, per-tissue means by
1D k-means (3 classes), diversity (pairwise MS-SSIM of the samples, next to the same among real
subjects) and MMD on histogram + coarse-layout features; see metrics.generation_metrics.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..datasets import Case, Dataset
from ..engine.batches import TrainingCase, mirror, whole_crop
from ..engine.latent import autoencoder_factor, latent_spec
from ..engine.network import downsampling_factor, network_config
from ..engine.sampling import sample_volume
from ..engine.space import from_unit, robust_scale, to_unit
from ..errors import DiffusionMICError
from ..metrics import generation_metrics
from ..models import ModelCard
from ..progress import Progress
from ..volume import Geometry, Volume, onto_grid, orient, resample_to
from . import from_labels, lesion_maps
from .base import RunOptions, RunResult, Task

NORMALISATION = {"method": "percentile", "percentile": 99.5, "value": 1.0}
NETWORK_3D = {"spatial_dims": 3, "channels": [32, 64, 64], "attention_levels": [False, False, False],
              "num_res_blocks": 1, "norm_num_groups": 16}
CLASS_MODES = (None, "lesion", "modality")


def output_grid(reference: Volume, spacing: list[float], factor: int) -> Geometry:
    """reference's box (RAS-oriented) at `spacing` mm, padded evenly to a multiple of `factor` voxels."""
    g = orient(reference, "RAS").geometry
    direction = np.reshape(g.direction, (3, 3))
    old, new = np.asarray(g.spacing, float), np.asarray(spacing, float)
    extent = np.asarray(g.size) * old
    size = np.ceil(extent / new / factor).astype(int) * factor
    corner = np.asarray(g.origin) - direction @ (old / 2) - direction @ ((size * new - extent) / 2)
    origin = corner + direction @ (new / 2)
    return Geometry(tuple(int(s) for s in size), tuple(new.tolist()), tuple(origin.tolist()), g.direction)


def sample_key(index: int, channel: int, name: str) -> str:
    """Output key of sample `index` (0-based), channel `channel`: output, 2, T2, 2-T2, ..."""
    parts = ([str(index + 1)] if index else []) + ([name] if channel else [])
    return "-".join(parts) or "output"


class Generate(Task):
    name = "generate"

    def make_card(self, dataset: Dataset, settings: dict[str, Any]) -> ModelCard:
        spec = settings.get("task", {})
        if spec.get("from_labels"):
            return from_labels.make_card(dataset, settings)
        mode = spec.get("classes")
        if mode not in CLASS_MODES:
            raise DiffusionMICError(f"generate: classes must be null, 'lesion' or 'modality', got {mode!r}")
        channels = list(spec.get("channels", dataset.channels if mode == "modality" else dataset.channels[:1]))
        missing = [c for c in channels if c not in dataset.channels]
        if missing or not channels:
            raise DiffusionMICError(f"generate: channels {', '.join(missing) or '(none)'} are not in the data set "
                                    f"({', '.join(dataset.channels)})")
        if mode == "lesion" and "lesion" not in dataset.labels:
            raise DiffusionMICError("generate: classes 'lesion' needs a label named 'lesion' in dataset.json")
        lesion_weight = float(spec.get("lesion_weight", 0.0))
        if lesion_weight < 0 or (lesion_weight and mode != "lesion"):
            raise DiffusionMICError(f"generate: lesion_weight must be >= 0 and needs classes 'lesion', "
                                    f"got {lesion_weight:g} with classes {mode!r}")
        lesion_map = bool(spec.get("lesion_map", False))
        if lesion_map and mode != "lesion":
            raise DiffusionMICError(f"generate: lesion_map needs classes 'lesion', got classes {mode!r}")
        classes = {"lesion": ["healthy", "lesion"], "modality": channels}.get(mode, [])
        outputs = ["image"] if mode == "modality" else channels
        net = {**NETWORK_3D, **settings.get("network", {}), "spatial_dims": 3}
        if "attention_levels" not in settings.get("network", {}):
            net["attention_levels"] = [False] * len(net["channels"])
        latent = latent_spec(settings["autoencoder"], len(outputs)) if "autoencoder" in settings else None
        width = latent["autoencoder"]["latent_channels"] if latent else len(outputs)
        network = network_config(width + lesion_map, width, len(classes) or None, **net)
        shrink = autoencoder_factor(latent) if latent else 1
        grid = settings.get("grid") or output_grid(dataset.cases[0].read(channels[0]),
                                                   list(spec.get("spacing", [4.0, 4.0, 4.0])),
                                                   shrink * downsampling_factor(network)).to_dict()
        geometry = Geometry.from_dict(grid)
        return ModelCard(
            name=settings.get("name", f"generate-{'-'.join(channels)}" + (f"-by-{mode}" if mode else "")),
            task=self.name, inputs=[], outputs=outputs,
            description=settings.get("description", f"3D whole-volume {'latent ' if latent else ''}diffusion model "
                                                    f"of {' + '.join(channels)} at {geometry.spacing[0]:g} mm"
                                                    + (f", conditioned on {mode}" if mode else "") + "."),
            network=network,
            schedule={"num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": "v_prediction",
                      **settings.get("schedule", {})},
            normalisation={**NORMALISATION, **settings.get("normalisation", {})},
            spacing=list(geometry.spacing), patch=[s // shrink for s in geometry.size[::-1]], grid=grid,
            classes=classes, latent=latent,
            sampler={"name": "dpm++2m", "steps": 20, **settings.get("sampler", {})},
            defaults={"guidance": 1.0, **settings.get("defaults", {})},
            training={"config": {"batch_size": 4, **settings.get("train", {})}, "variant": spec.get("variant"),
                      **({"lesion_weight": lesion_weight} if lesion_weight else {}),
                      **({"lesion_map": True, "lesion_label": dataset.labels["lesion"]} if lesion_map else {})},
        )

    def _examples(self, card: ModelCard, dataset: Dataset, case: Case) -> list[tuple[list[Volume], int | None]]:
        """(volumes, class) pairs one case gives."""
        mode = ("modality" if card.outputs == ["image"] else "lesion") if card.classes else None
        channels = card.classes if mode == "modality" else card.outputs
        variant = card.training.get("variant")
        if mode == "modality":
            return [([case.read(ch, variant)], i) for i, ch in enumerate(channels)]
        images = [case.read(ch, variant) for ch in channels]
        if mode is None:
            return [(images, None)]
        lesion = dataset.labels["lesion"]
        sick = case.label is not None and bool(np.any(case.read_label().array == lesion))
        out = [(images, card.classes.index("lesion" if sick else "healthy"))]
        if all(ch in case.variants.get("healthyTr", {}) for ch in channels):
            out.append(([case.read(ch, "healthyTr") for ch in channels], card.classes.index("healthy")))
        return out

    def training_cases(self, card: ModelCard, dataset: Dataset, cases: list[Case]) -> list[TrainingCase]:
        if card.inputs:
            return from_labels.training_cases(card, dataset, cases)
        grid = Geometry.from_dict(card.grid)
        centre = whole_crop(grid.size[::-1])
        lesion_weight = float(card.training.get("lesion_weight", 0.0))
        with_map = bool(card.training.get("lesion_map"))
        out = []
        for case in cases:
            lesions = lesion_maps.case_lesions(dataset, case, grid) if lesion_weight or with_map else None
            weight = (1.0 + lesion_weight * (lesions > 0.1)).astype(np.float32) if lesion_weight else None
            for volumes, label in self._examples(card, dataset, case):
                arrays = np.stack([to_unit(onto_grid(v, grid), robust_scale(v.array, card.normalisation))
                                   for v in volumes])
                cond = None
                if with_map:     # a healthy example (the twin too) is told: no lesion here
                    cond = (lesions if card.classes[label] == "lesion" else np.zeros_like(lesions))[None]
                out.append(TrainingCase(target=arrays, cond=cond, label=label, foreground=centre, weight=weight))
        return out

    def calibrate(self, card: ModelCard, network: torch.nn.Module, dataset: Dataset, cases: list,
                  device: torch.device, progress: Progress) -> None:
        """A lesion-map model keeps its training subjects' lesion maps: what `--condition lesion` draws
        without a mask."""
        if not card.training.get("lesion_map"):
            return
        grid = Geometry.from_dict(card.grid)
        maps = [lesion_maps.case_lesions(dataset, case, grid) for case in cases]
        card.training["lesion_maps"] = lesion_maps.keep([lesion_maps.unet_grid(card, m) for m in maps if m.max() > 0.1])

    def augment(self, card: ModelCard):
        if card.inputs or card.latent:      # a latent model learns each case's mirror image's latent instead
            return None
        return mirror

    def run(self, card: ModelCard, network: torch.nn.Module, volumes: list[Volume], options: RunOptions,
            progress: Progress, device: torch.device) -> RunResult:
        if card.inputs:
            if options.condition is not None:
                raise DiffusionMICError(f"model '{card.name}' is conditioned by its label map: it takes no --condition")
            progress.start("generate", 0)
            drawn = from_labels.samples(card, network, volumes, options, progress, device)
            progress.close()
            return RunResult({sample_key(i, c, ch): v for i, sample in enumerate(drawn)
                              for c, (ch, v) in enumerate(zip(card.outputs, sample))},
                             {"count": options.count, "channels": card.outputs, "labels": dict(card.labels)})
        with_map = bool(card.training.get("lesion_map"))
        if volumes and not with_map:
            raise DiffusionMICError("generate takes no input volume: the output grid comes from the model card "
                                    "(a model trained from label maps or lesion maps takes one)")
        if len(volumes) > 1 or (volumes and options.condition != "lesion"):
            raise DiffusionMICError(f"model '{card.name}' takes one input, a lesion mask, with --condition lesion")
        if options.lesion_load is not None and (not with_map or options.condition != "lesion" or volumes):
            raise DiffusionMICError(f"--lesion-load needs --condition lesion, no lesion mask, and a model with a "
                                    f"lesion map ('{card.name}' {'has one' if with_map else 'has none'})")
        if not card.grid:
            raise DiffusionMICError(f"model '{card.name}' has no output grid in its card")
        grid = Geometry.from_dict(card.grid)
        label = None
        if card.classes:
            if options.condition is None:
                label = len(card.classes)             # the null class: unconditional
            elif options.condition not in card.classes:
                raise DiffusionMICError(f"unknown condition {options.condition!r}; model '{card.name}' "
                                        f"knows {', '.join(card.classes)}")
            else:
                label = card.classes.index(options.condition)
        elif options.condition is not None:
            raise DiffusionMICError(f"model '{card.name}' is unconditional: it takes no --condition")
        progress.start("generate", 0)
        outputs: dict[str, Volume] = {}
        given = lesion_maps.from_mask(card, volumes[0]) if volumes else None
        # a lesion-map model guides lesion samples away from a healthy one on an empty map
        negative = card.classes.index("healthy") if with_map and options.condition == "lesion" else None
        loads = []
        for i in range(options.count):
            generator = torch.Generator().manual_seed(options.seed + i)
            cond = None
            if with_map:       # the healthy and the null class: no lesion
                if given is not None:
                    cond = given
                elif options.condition != "lesion":
                    cond = np.zeros((1, *card.patch), np.float32)
                elif options.lesion_load is not None:
                    cond = lesion_maps.composed(card, options.seed + i, options.lesion_load)
                else:
                    cond = lesion_maps.drawn(card, options.seed + i)
                loads.append(lesion_maps.load_ml(card, cond))
            x = sample_volume(card, network, cond, shape=tuple(card.patch), class_label=label,
                              guidance=options.guidance, negative_class=negative, sampler=options.sampler,
                              steps=options.steps, generator=generator, device=device, progress=progress,
                              batch_size=options.batch_size)
            if card.latent:
                x = network.decode(torch.from_numpy(x[None]).to(device))[0].float().cpu().numpy()
            for c, channel in enumerate(card.outputs):
                outputs[sample_key(i, c, channel)] = Volume(from_unit(np.clip(x[c], -1.0, None)), grid)
        progress.close()
        names = options.condition if options.condition is not None else ("unconditional" if card.classes else None)
        return RunResult(outputs, {"count": options.count, "condition": names, "guidance": options.guidance,
                                   "channels": card.outputs, "spacing_mm": list(grid.spacing),
                                   **({"lesion_load_ml": loads} if with_map else {})})

    def evaluate(self, pred: Volume, ref: Volume, mask: Volume | None) -> dict[str, Any]:
        return generation_metrics([pred], [ref])

    def evaluate_many(self, preds: list[Volume], refs: list[Volume], masks: list[Volume] | None) -> dict[str, Any]:
        """Samples (--pred, several) against real subjects (--ref, several); masks are not used."""
        return generation_metrics(preds, refs)

