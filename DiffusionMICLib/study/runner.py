"""`diffusion-mic study TASK`: train every method of a task on the same cases with the same
budget, evaluate all on the same held-out cases, write DIR/TASK.json, DIR/TASK.md, DIR/TASK.png.

Resuming: each method works in DIR/TASK/<method>/; `trained.json` there means its training
finished (it is not trained again), `result.json` that its evaluation finished. Delete a
method's folder to redo it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..engine.sampling import select_device
from ..errors import DiffusionMICError
from ..progress import Progress
from .core import FULL, QUICK, Context, Evaluation, Method, StudyData, phantom_data, user_data, write_json
from .tables import markdown, metric_columns, task_figure

TASKS = ("generate", "translate", "segment", "denoise", "anomaly", "speed")   # speed: the peer-path pseudo-task


def task_study(task: str):
    """The task's study module (methods, metric columns, data requirements)."""
    if task not in TASKS:
        raise DiffusionMICError(f"unknown study task {task!r}; use one of {', '.join(TASKS)} (or 'report DIR')")
    import importlib
    return importlib.import_module(f".{task}", __package__)


def select_methods(module, names: list[str] | None, ctx_quick: bool) -> list[Method]:
    methods = module.methods(ctx_quick)
    if not names:
        return methods
    known = {m.name: m for m in methods}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise DiffusionMICError(f"unknown {module.TASK} method(s) {', '.join(unknown)}; "
                                f"use {', '.join(known)}")
    return [known[n] for n in names]


def study_data(task: str, module, data: str | Path | None, out: Path, quick: bool) -> StudyData:
    budget = QUICK if quick else FULL
    sd = phantom_data(out / "data", budget) if data is None else user_data(Path(data))
    needed = getattr(module, "REQUIRED_CHANNELS", getattr(module, "CHANNELS", []))   # every channel it reads
    missing = [c for c in needed if c not in sd.train.channels]
    if missing:
        raise DiffusionMICError(f"the {task} study needs channels {', '.join(needed)}; "
                                f"'{sd.train_dir}' lacks {', '.join(missing)}")
    return sd


def run_study(task: str, *, data: str | Path | None = None, out: str | Path = "study", quick: bool = False,
              methods: list[str] | None = None, device: str = "auto", progress: Progress | None = None) -> dict[str, Any]:
    """Run (or resume) the study of one task; returns what it wrote."""
    module = task_study(task)
    out = Path(out)
    chosen = select_methods(module, methods, quick)           # bad names fail before anything is written
    if data is not None:
        user_data(Path(data))                                 # a bad data set fails before anything is written
    progress = progress or Progress()
    sd = study_data(task, module, data, out, quick)
    ctx = Context(task=task, out=out / task, data=sd, budget=QUICK if quick else FULL, quick=quick,
                  device=select_device(device), progress=progress)
    if hasattr(module, "write_reference"):
        module.write_reference(ctx)
    results: dict[str, Any] = {}
    for method in chosen:
        results[method.name] = _run_method(ctx, method)
    doc = {"task": task, "quick": quick, "data": sd.source, "budget": ctx.budget.to_dict(),
           "columns": metric_columns(module), "methods": results,
           "notes": list(getattr(module, "NOTES", []))}
    previous = out / f"{task}.json"
    if previous.is_file() and methods:     # a partial rerun (--methods) keeps the other methods' rows
        old = json.loads(previous.read_text(encoding="utf-8"))
        if old.get("quick") == quick:
            doc["methods"] = {**old.get("methods", {}), **results}
            # and the data parts only the other methods read (e.g. a cohort a resumed row did not need again)
            doc["data"] = {**old.get("data", {}), **doc["data"]}
    write_json(previous, doc)
    (out / f"{task}.md").write_text(markdown(doc), encoding="utf-8")
    task_figure(out / f"{task}.png", doc, ctx.out)
    return {"json": str(previous), "markdown": str(out / f"{task}.md"), "figure": str(out / f"{task}.png"),
            "methods": list(doc["methods"])}


def _run_method(ctx: Context, method: Method) -> dict[str, Any]:
    folder = ctx.out / method.name
    done = folder / "result.json"
    if done.is_file():
        return json.loads(done.read_text(encoding="utf-8"))
    folder.mkdir(parents=True, exist_ok=True)
    trained = folder / "trained.json"
    training: dict[str, Any] | None = None
    if method.fit is not None:
        if trained.is_file():
            training = json.loads(trained.read_text(encoding="utf-8"))
        else:
            training = method.fit(ctx, folder)
            write_json(trained, training)
    t0 = time.perf_counter()
    evaluation: Evaluation = method.evaluate(ctx, folder)
    if evaluation.previews:
        np.savez_compressed(folder / "previews.npz", **evaluation.previews)
    result = {"label": method.label, "family": method.family, "note": method.note, "training": training,
              "tables": evaluation.tables, "seconds_per_volume": evaluation.seconds_per_volume,
              "evaluation_wall_s": round(time.perf_counter() - t0, 1), **evaluation.extra}
    write_json(done, result)
    return result
