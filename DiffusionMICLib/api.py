"""The Python API: one function per task, taking and returning volumes with geometry."""
from __future__ import annotations

import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from .engine.sampling import select_device
from .errors import DiffusionMICError, DiffusionMICWarning
from .inputs import align_inputs, check_dimensions, intensity_warnings
from .models import load_model
from .progress import Progress, ProgressCallback, as_progress
from .tasks import RunOptions, RunResult, get_task
from .volume import Volume


def run(task: str, model: str | Path, volumes: list[Volume], options: RunOptions | None = None, *,
        progress: Progress | ProgressCallback | None = None,
        cancel: Callable[[], bool] | None = None) -> RunResult:
    """Run a task's model on input volumes; outputs are on the first input's exact grid.

    Other inputs on other grids are resampled onto the first one's (info["resampled"] says which);
    inputs far outside the intensities the model was trained on give a DiffusionMICWarning each,
    also listed in info["warnings"]. A 2D image (planar volume) gives planar outputs.
    """
    spec = get_task(task)
    options = options or RunOptions()
    device = select_device(options.device)
    card, network = load_model(model, device)
    if card.task != spec.name:
        raise DiffusionMICError(f"model '{card.name}' is a {card.task} model, not a {spec.name} model")
    options = options.with_card_defaults(card)
    volumes, resampled = align_inputs(volumes)
    check_dimensions(card, volumes)
    notes = intensity_warnings(card, volumes)
    for note in notes:
        warnings.warn(note, DiffusionMICWarning, stacklevel=2)
    t0 = time.perf_counter()
    with torch.inference_mode():
        result = spec.run(card, network, volumes, options, as_progress(progress, cancel), device)
    if volumes and volumes[0].planar:     # a 2D image in, 2D images out
        grid = volumes[0].geometry
        result.outputs = {k: Volume(v.array, grid, planar=True) if v.geometry.same_as(grid) else v
                          for k, v in result.outputs.items()}
    result.info.update(seed=options.seed, sampler=options.sampler, steps=options.steps,
                       model=card.name, device=str(device), wall_time_s=round(time.perf_counter() - t0, 2),
                       resampled=resampled, warnings=notes)
    return result


def _task_fn(task: str) -> Callable[..., Any]:
    def call(volumes: Volume | list[Volume], model: str | Path, *, progress=None, cancel=None,
             **options: Any) -> RunResult:
        vols = [volumes] if isinstance(volumes, Volume) else list(volumes)
        return run(task, model, vols, replace(RunOptions(), **options), progress=progress, cancel=cancel)
    call.__name__ = task
    call.__doc__ = (f"Run the {task} task: `{task}(volumes, model, steps=.., seed=.., progress=cb, cancel=fn)`;"
                    " returns a RunResult whose outputs['output'] is a Volume on the input's grid.")
    return call


denoise = _task_fn("denoise")
translate = _task_fn("translate")
segment = _task_fn("segment")
anomaly = _task_fn("anomaly")
detect_anomalies = anomaly


def generate(model: str | Path, *, count: int = 1, condition: str | None = None, labels: Volume | None = None,
             progress=None, cancel=None, **options: Any) -> RunResult:
    """Sample `count` new volumes: `generate(model, count=2, condition="lesion", guidance=3.0, seed=0)`
    (the grid comes from the model card), or, with a model trained from label maps, images that
    match a label map on its grid: `generate(model, labels=label_volume)`; a model with a lesion
    map takes a lesion mask the same way, with condition="lesion". Outputs are "output",
    "2", ... (see DiffusionMICLib.tasks.generate and .from_labels)."""
    return run("generate", model, [] if labels is None else [labels],
               replace(RunOptions(), count=count, condition=condition, **options), progress=progress, cancel=cancel)


def evaluate(task: str, pred: Volume, ref: Volume, mask: Volume | None = None) -> dict[str, Any]:
    """The task's metrics of a prediction against a reference (inside an optional mask)."""
    return get_task(task).evaluate(pred, ref, mask)


def evaluate_many(task: str, preds: list[Volume], refs: list[Volume],
                  masks: list[Volume] | None = None) -> dict[str, Any]:
    """Metrics over several predictions and references (e.g. anomaly maps of several subjects,
    or generated samples against real subjects); one mask serves every prediction."""
    spec = get_task(task)
    if not hasattr(spec, "evaluate_many"):
        if len(preds) == 1 and len(refs) == 1:
            return spec.evaluate(preds[0], refs[0], masks[0] if masks else None)
        raise DiffusionMICError(f"{task} evaluates one --pred against one --ref")
    if masks is not None and len(masks) == 1 and len(preds) > 1:
        masks = masks * len(preds)
    return spec.evaluate_many(list(preds), list(refs), masks)


