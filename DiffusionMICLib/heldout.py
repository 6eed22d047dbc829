"""Held-out evaluation of the five tasks on phantom subjects, shared by the demo and the model cards.

One function per task runs a model on a phantom case the way a user would (acquired, noisy
images in) and returns an `Outcome`: the volumes to save, the metrics against the case's
references (clean images, label map), and the four panels of its figure. `diffusion-mic demo`
runs them on one held-out subject; `evaluate_model` (`diffusion-mic models evaluate`) on several,
and averages the metrics for the model card.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy import ndimage

from . import api
from .datasets import Case, read_dataset
from .engine.space import robust_scale
from .errors import DiffusionMICError
from .metrics import bright_tail_fractions, generation_metrics, segmentation_metrics
from .models import read_card, resolve_model
from .progress import Progress
from .tasks.generate import onto_grid, sample_key
from .tasks.segment import largest_component
from .tasks.translate import NORMALISATION as TRANSLATE_SCALE
from .volume import Geometry, Volume

LESION = 4   # the phantom's lesion label; every abnormal tissue (lesion kinds, tumour) is >= 4
SEGMENTER = "brain-mri-lesion-segment"   # the bundled segmenter that checks images drawn from label maps


@dataclass
class Panel:
    title: str
    volume: Volume
    style: str = "gray"     # gray | labels | heat | diff


@dataclass
class Outcome:
    """What one task produced on one subject."""

    outputs: dict[str, Volume]             # file stem -> volume
    metrics: dict[str, Any]
    panels: list[Panel] = field(default_factory=list)
    focus: tuple[int, int, int] | None = None   # (z, y, x) voxel the figure's slices go through


def brain(case: Case) -> Volume:
    labels = case.read_label()
    return labels.with_array((labels.array > 0).astype(np.uint8))


def lesion_centre(case: Case) -> tuple[int, int, int]:
    """The centre of the case's largest lesion, or of its brain when it has none."""
    labels = case.read_label().array
    lesion = labels >= LESION
    region = largest_component(lesion.astype(np.uint8)) > 0 if lesion.any() else labels > 0
    return tuple(int(round(c)) for c in ndimage.center_of_mass(region))


def _normalised(v: Volume) -> Volume:
    return v.with_array(v.array.astype(np.float32) / robust_scale(v.array, TRANSLATE_SCALE))


def _difference(a: Volume, b: Volume) -> Volume:
    return a.with_array(np.abs(a.array.astype(np.float32) - b.array.astype(np.float32)))


def denoise(model: str | Path, case: Case, progress: Progress, channel: str = "T1", **options: Any) -> Outcome:
    noisy, clean, mask = case.read(channel), case.read(channel, "cleanTr"), brain(case)
    result = api.denoise(noisy, model, progress=progress, **options).outputs["output"]
    before, after = api.evaluate("denoise", noisy, clean, mask), api.evaluate("denoise", result, clean, mask)
    metrics = {"channel": channel, "input": before, "result": after, "psnr_gain_db": after["psnr"] - before["psnr"]}
    return Outcome({f"{channel}-denoised": result}, metrics,
                   [Panel(f"input ({channel}, noisy)", noisy), Panel("denoised", result),
                    Panel("reference (clean)", clean), Panel("|result - reference|", _difference(result, clean), "diff")],
                   lesion_centre(case))


def translate(model: str | Path, case: Case, progress: Progress, **options: Any) -> Outcome:
    card = read_card(resolve_model(model))
    inputs = [case.read(ch) for ch in card.inputs]
    reference, mask = case.read(card.outputs[0], "cleanTr"), brain(case)
    result = api.translate(inputs, model, progress=progress, **options).outputs["output"]
    metrics = api.evaluate("translate", result, reference, mask)
    copies = {ch: api.evaluate("translate", v, reference, mask)["psnr"] for ch, v in zip(card.inputs, inputs)}
    best = max(copies, key=copies.get)
    target = card.outputs[0]
    return Outcome({f"{'-'.join(card.inputs)}-to-{target}": result},
                   {"result": metrics, "baseline_copy_input": {"channel": best, "psnr": copies[best]}},
                   [Panel(f"input ({card.inputs[0]})", inputs[0]), Panel(f"synthetic {target}", result),
                    Panel(f"reference ({target})", _normalised(reference)),
                    Panel("|result - reference|", _difference(_normalised(result), _normalised(reference)), "diff")],
                   lesion_centre(case))


def segment(model: str | Path, case: Case, progress: Progress, **options: Any) -> Outcome:
    card = read_card(resolve_model(model))
    inputs = [case.read(ch) for ch in card.inputs]
    reference = case.read_label()
    run = api.segment(inputs, model, progress=progress, **options)
    labels = run.outputs["output"]
    metrics = segmentation_metrics(labels, reference, card.labels)
    wrong = labels.with_array((np.rint(labels.array) != np.rint(reference.array)).astype(np.uint8))
    shown = card.inputs.index("FLAIR") if "FLAIR" in card.inputs else 0
    return Outcome({"segmentation": labels, "segmentation-uncertainty": run.outputs["uncertainty"]}, metrics,
                   [Panel(f"input ({card.inputs[shown]})", inputs[shown]), Panel("segmentation", labels, "labels"),
                    Panel("reference labels", reference, "labels"), Panel("disagreement", wrong, "diff")],
                   lesion_centre(case))


def anomaly(model: str | Path, case: Case, progress: Progress, **options: Any) -> Outcome:
    card = read_card(resolve_model(model))
    inputs = [case.read(ch) for ch in card.inputs]
    reference = case.read_label()
    lesion = reference.with_array((reference.array >= LESION).astype(np.uint8))
    run = api.anomaly(inputs, model, progress=progress, **options)
    amap, amask = run.outputs["output"], run.outputs["mask"]
    metrics = {**api.evaluate("anomaly", amap, reference), "score": run.info.get("score"),
               "anomalous": run.info.get("anomalous"), "mask_dice": _dice(amask.array > 0, lesion.array > 0)}
    errors = amask.with_array(((amask.array > 0) != (lesion.array > 0)).astype(np.uint8))
    return Outcome({"anomaly-map": amap, "anomaly-mask": amask}, metrics,
                   [Panel(f"input ({card.inputs[0]})", inputs[0]), Panel("anomaly map", amap, "heat"),
                    Panel("reference lesions", lesion, "labels"), Panel("mask vs reference", errors, "diff")],
                   lesion_centre(case))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)


def generate(model: str | Path, cases: list[Case], progress: Progress, count: int = 2, seed: int = 0,
             **options: Any) -> Outcome:
    """`count` samples per class (healthy, lesion; or unconditional) against the cases' clean images."""
    card = read_card(resolve_model(model))
    conditions = card.classes or [None]
    samples: dict[str | None, list[dict[str, Volume]]] = {}
    for k, condition in enumerate(conditions):
        run = api.generate(model, count=count, condition=condition, seed=seed + 1000 * k, progress=progress, **options)
        samples[condition] = [{ch: run.outputs[sample_key(i, c, ch)] for c, ch in enumerate(card.outputs)}
                              for i in range(count)]
    grid = Geometry.from_dict(card.grid)
    metrics: dict[str, Any] = {"conditions": [c or "unconditional" for c in conditions], "per_channel": {}}
    for ch in card.outputs:
        fakes = [s[ch] for group in samples.values() for s in group]
        reals = [case.read(ch, "cleanTr") for case in cases]
        m = generation_metrics(fakes, reals)
        means = np.asarray(m["tissue_means"]["samples"]), np.asarray(m["tissue_means"]["reals"])
        m["tissue_mean_relative_error"] = (np.abs(means[0] - means[1]) / means[1]).tolist()
        first = [group[0][ch].array for group in samples.values()]
        seeds = [s[ch].array for s in next(iter(samples.values()))]
        m["seed_difference"] = float(np.mean(np.abs(seeds[0] - seeds[1]))) if len(seeds) > 1 else None
        m["condition_difference"] = float(np.mean(np.abs(first[0] - first[1]))) if len(first) > 1 else None
        if set(conditions) == {"healthy", "lesion"} and all(ch in c.variants.get("healthyTr", {}) for c in cases):
            # does the lesion condition draw hyperintensities? (the same subjects without lesions set the bar)
            healthy = [case.read(ch, "healthyTr") for case in cases]
            m["bright_tail"] = bright_tail_fractions(
                {"healthy samples": [s[ch] for s in samples["healthy"]], "lesion samples": [s[ch] for s in samples["lesion"]],
                 "real healthy": healthy, "real lesion": reals}, healthy)
        metrics["per_channel"][ch] = m
    outputs = {f"generated-{c or 'sample'}-{i + 1}-{ch}": v for c, group in samples.items()
               for i, s in enumerate(group) for ch, v in s.items()}
    first_ch, last_ch = card.outputs[0], card.outputs[-1]
    groups = list(samples.items())
    real = Volume(onto_grid(_normalised(cases[0].read(first_ch, "cleanTr")), grid), grid)
    panels = [Panel(f"{groups[0][0] or 'sample'} 1 ({first_ch})", groups[0][1][0][first_ch]),
              Panel(f"{groups[0][0] or 'sample'} 2 ({first_ch})", groups[0][1][min(1, count - 1)][first_ch]),
              Panel(f"real subject ({first_ch})", real),
              Panel(f"{groups[-1][0] or 'sample'} 1 ({last_ch})", groups[-1][1][0][last_ch])]
    return Outcome(outputs, metrics, panels)


def from_labels(model: str | Path, case: Case, progress: Progress, segmenter: str = SEGMENTER,
                real_segmentation: Volume | None = None, **options: Any) -> Outcome:
    """Images drawn for the case's label map: each tissue's median against the case's own images
    (both in units of their robust scale), and whether `segmenter` recovers the labels from them
    (its Dice on the drawn images next to its Dice on the real ones; `real_segmentation`: its
    output on the real images where already computed, so that it is not run twice)."""
    card = read_card(resolve_model(model))
    reference = case.read_label()
    labels = np.rint(reference.array).astype(int)
    run = api.generate(model, labels=reference, progress=progress, **options)
    drawn = {ch: run.outputs[sample_key(0, c, ch)] for c, ch in enumerate(card.outputs)}
    real = {ch: case.read(ch) for ch in card.outputs}
    tissues = {name: v for name, v in card.labels.items() if v and np.any(labels == v)}

    def medians(v: Volume) -> dict[str, float]:
        a = _normalised(v).array
        return {name: float(np.median(a[labels == value])) for name, value in tissues.items()}
    metrics: dict[str, Any] = {"tissue_medians": {ch: {"drawn": medians(drawn[ch]), "real": medians(real[ch])}
                                                  for ch in card.outputs}}
    seg_card = read_card(resolve_model(segmenter))
    if set(seg_card.inputs) <= set(card.outputs):
        def dice(images: dict[str, Volume], out: Volume | None = None) -> dict[str, float]:
            if out is None:
                out = api.segment([images[ch] for ch in seg_card.inputs], segmenter, progress=progress).outputs["output"]
            per = segmentation_metrics(out, reference, seg_card.labels)["labels"]
            return {name: per[name]["dice"] for name in tissues if name in per}
        metrics["segmenter"] = {"model": segmenter, "dice_drawn": dice(drawn),
                                "dice_real": dice(real, real_segmentation)}
    shown = "FLAIR" if "FLAIR" in card.outputs else card.outputs[0]
    return Outcome({f"from-labels-{ch}": v for ch, v in drawn.items()}, metrics,
                   [Panel("label map", reference, "labels"), Panel(f"drawn {card.outputs[0]}", drawn[card.outputs[0]]),
                    Panel(f"drawn {shown}", drawn[shown]), Panel(f"real {shown}", _normalised(real[shown]))],
                   lesion_centre(case))


def mean_metrics(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean of every number found at the same place in each run's metrics (other values: the first run's)."""
    first = runs[0]
    if isinstance(first, dict):
        return {k: mean_metrics([r[k] for r in runs]) for k in first if all(isinstance(r, dict) and k in r for r in runs)}
    if isinstance(first, (int, float)) and not isinstance(first, bool) and all(
            isinstance(r, (int, float)) and not isinstance(r, bool) for r in runs):
        return float(np.mean(runs))
    return first


RUNNERS: dict[str, Callable[..., Outcome]] = {"denoise": denoise, "translate": translate, "segment": segment,
                                              "anomaly": anomaly}


def evaluate_model(model: str | Path, data: str | Path, progress: Progress | None = None,
                   **options: Any) -> dict[str, Any]:
    """A model's metrics on every case of a held-out phantom data set: the mean and each case's."""
    progress = progress or Progress()
    card = read_card(resolve_model(model))
    dataset = read_dataset(data)
    info = json.loads((Path(data) / "dataset.json").read_text(encoding="utf-8")).get("phantom", {})
    held = {"data": str(data), "phantom_seed": info.get("seed"), "noise_percent": info.get("noise"),
            "cases": [c.id for c in dataset.cases]}
    if card.task == "generate" and card.inputs:
        runs = [from_labels(model, case, progress, **options).metrics for case in dataset.cases]
        return {**held, "mean": mean_metrics(runs), "per_case": runs}
    if card.task == "generate":
        return {**held, **generate(model, dataset.cases, progress, count=max(2, len(dataset.cases) // 2),
                                   **options).metrics}
    if card.task not in RUNNERS:
        raise DiffusionMICError(f"no held-out evaluation for task '{card.task}'")
    runs = [RUNNERS[card.task](model, case, progress, **options).metrics for case in dataset.cases]
    return {**held, "mean": mean_metrics(runs), "per_case": runs}
