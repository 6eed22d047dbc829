"""The study's shared parts: budgets, the data every method sees, a method's description, and
the runner context. A task's study file (study/denoise.py, ...) lists its methods and says how
each is evaluated; study/runner.py trains, evaluates, resumes and writes the tables."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..datasets import Case, Dataset, read_dataset
from ..errors import DiffusionMICError
from ..models import read_card, resolve_model
from ..progress import Progress

PHANTOM_TRAIN_SEED = 100      # the bundled models' training subjects
PHANTOM_TEST_SEED = 9001      # held-out subjects: a seed training never uses
SPLIT_SEED = 0                # a user's data set: the fixed seed of the train/test split


@dataclass(frozen=True)
class Budget:
    """What every learned method of a task gets: the same optimiser steps of the same batch size
    (the same training examples seen). The wall-time limit is a safety stop, set far above what
    the steps take on an idle 2-core CPU, so that a busy machine changes times, not results."""

    steps: int
    batch_size: int
    time_limit_s: float
    train_subjects: int
    test_subjects: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


QUICK = Budget(steps=12, batch_size=4, time_limit_s=20.0, train_subjects=2, test_subjects=1)
FULL = Budget(steps=1500, batch_size=8, time_limit_s=1800.0, train_subjects=12, test_subjects=4)


@dataclass
class StudyData:
    """Training cases and held-out cases of one data set, and where they came from."""

    name: str
    train_dir: Path
    train: Dataset
    train_ids: list[str]
    test: list[Case]
    source: dict[str, Any]

    @property
    def train_cases(self) -> list[Case]:
        return [c for c in self.train.cases if c.id in set(self.train_ids)]


@dataclass
class Method:
    """One row of a task's table.

    fit(ctx, folder) trains into folder and returns the budget it used (steps, batch, wall time);
    None for methods that learn nothing. evaluate(ctx, folder) returns an Evaluation.
    """

    name: str
    label: str
    family: str                   # diffusion | learned | classic | floor
    evaluate: Callable[["Context", Path], "Evaluation"]
    fit: Callable[["Context", Path], dict[str, Any]] | None = None
    note: str = ""


@dataclass
class Evaluation:
    """A method's numbers per data set (table name -> metric -> value), the seconds it took per
    volume, and 2D previews for the figure (panel name -> image, the same slices for every method)."""

    tables: dict[str, dict[str, float | None]]
    seconds_per_volume: float | None = None
    previews: dict[str, np.ndarray] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    task: str
    out: Path                 # DIR/TASK: one folder per method below it
    data: StudyData
    budget: Budget
    quick: bool
    device: torch.device
    progress: Progress
    cache: dict[str, Any] = field(default_factory=dict)   # per-run scratch (e.g. prepared test inputs)


def write_json(path: Path, value: Any) -> None:
    """Write JSON atomically (a reader never sees half a file; an interrupted write leaves the old one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, default=_jsonable) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON: {type(value).__name__}")


def phantom_data(folder: Path, budget: Budget, noise: float = 5.0) -> StudyData:
    """Phantom training subjects (seed 100) and held-out subjects (seed 9001), written once."""
    from ..phantom import write_phantom
    parts = {"train": (PHANTOM_TRAIN_SEED, budget.train_subjects), "test": (PHANTOM_TEST_SEED, budget.test_subjects)}
    sets = {}
    for part, (seed, n) in parts.items():
        where = folder / f"phantom-{part}-seed{seed}-n{n}"
        if not (where / "dataset.json").is_file():
            write_phantom(where, subjects=n, seed=seed, resolution=2.0, noise=noise, lesions=3)
        sets[part] = read_dataset(where)
    train = sets["train"]
    return StudyData(name="phantom", train_dir=train.root, train=train, train_ids=[c.id for c in train.cases],
                     test=sets["test"].cases,
                     source={"kind": "phantom", "resolution_mm": 2.0, "noise_percent": noise,
                             "train_seed": PHANTOM_TRAIN_SEED, "train_subjects": budget.train_subjects,
                             "test_seed": PHANTOM_TEST_SEED, "test_subjects": budget.test_subjects})


def user_data(root: Path, test_fraction: float = 0.2) -> StudyData:
    """A user's nnU-Net v2 / MSD data set, split into training and test cases by a fixed seed."""
    dataset = read_dataset(root)
    if len(dataset.cases) < 2:
        raise DiffusionMICError(f"'{root}' has {len(dataset.cases)} case(s); a study needs at least 2 (train and test)")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(dataset.cases))
    n_test = max(1, int(round(len(order) * test_fraction)))
    test = [dataset.cases[i] for i in sorted(order[:n_test])]
    train_ids = [dataset.cases[i].id for i in sorted(order[n_test:])]
    return StudyData(name=Path(root).name, train_dir=Path(root), train=dataset, train_ids=train_ids, test=test,
                     source={"kind": "dataset", "path": str(root), "split_seed": SPLIT_SEED,
                             "train_cases": train_ids, "test_cases": [c.id for c in test]})


def budget_recipe(ctx: Context, recipe: dict[str, Any], quick_network: dict[str, Any] | None = None,
                  **task: Any) -> dict[str, Any]:
    """A diffusion model's training settings (its bundled model's train.json) at the study's budget,
    on the study's training cases; `task` overrides entries of its "task" settings."""
    b = ctx.budget
    settings = {**recipe, "train": {**recipe.get("train", {}), "max_steps": b.steps, "batch_size": b.batch_size,
                                    "time_limit_s": b.time_limit_s},
                "cases": ctx.data.train_ids, "command": f"diffusion-mic study {ctx.task}{' --quick' if ctx.quick else ''}"}
    if task:
        settings["task"] = {**recipe.get("task", {}), **task}
    if ctx.quick and quick_network is not None:
        settings["network"] = quick_network
    return settings


def budget_used(training: dict[str, Any]) -> dict[str, Any]:
    """The budget a diffusion model trained with (its card's `training`), as the tables give it."""
    return {"steps": training["steps"], "batch_size": training["config"]["batch_size"],
            "wall_time_s": training["wall_time_s"]}


def bundled_note(name: str, extra: str = "") -> str:
    """The table note of a bundled model's row: the budget it was trained with (not the study's)."""
    try:
        card = read_card(resolve_model(name))
    except (DiffusionMICError, OSError):      # no bundled models beside this installation
        return "not budget-matched"
    t = card.training
    return (f"not budget-matched: {t['steps']} × {t['config']['batch_size']} steps in "
            f"{t['wall_time_s'] / 60:.0f} min CPU, {len(t.get('cases', []))} subjects{extra}")

