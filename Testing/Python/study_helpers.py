"""A study context on the session's small phantom sets (training: 3 subjects of seed 0; test: one
subject of seed 1234), for learning tests that call a study's methods directly."""
from __future__ import annotations

from pathlib import Path

import torch

from DiffusionMICLib.datasets import read_dataset
from DiffusionMICLib.progress import Progress
from DiffusionMICLib.study.core import Budget, Context, StudyData


def study_context(task: str, out: Path, train_dir: Path, test_dir: Path, steps: int, batch_size: int = 8,
                  kind: str = "phantom") -> Context:
    """A quick-mode context (slab test volumes) whose learned methods get `steps` x `batch_size`;
    kind "dataset": no extra phantom subjects (the anomaly study's healthy test and validation sets)."""
    train = read_dataset(train_dir)
    test = read_dataset(test_dir).cases
    data = StudyData(name="phantom", train_dir=Path(train_dir), train=train, train_ids=[c.id for c in train.cases],
                     test=test, source={"kind": kind, "resolution_mm": 2.0, "noise_percent": 5.0})
    budget = Budget(steps=steps, batch_size=batch_size, time_limit_s=600.0, train_subjects=len(train.cases),
                    test_subjects=len(test))
    return Context(task=task, out=Path(out) / task, data=data, budget=budget, quick=True,
                   device=torch.device("cpu"), progress=Progress())


def slab_dataset(source: Path, out: Path, case: int = 0, depth: int = 8) -> Path:
    """One subject of a phantom data set cut to `depth` axial slices around its largest lesion
    slice (every folder: imagesTr, labelsTr, cleanTr, healthyTr), as a data set of its own: a
    tiny problem that a baseline can learn in a few dozen steps."""
    import shutil

    import numpy as np

    from DiffusionMICLib.study.segment import cut_slab, largest_slice
    from DiffusionMICLib.volume import read_volume, write_volume
    source, out = Path(source), Path(out)
    name = sorted(p.name for p in (source / "labelsTr").iterdir())[case]
    label = read_volume(source / "labelsTr" / name)
    z = largest_slice(label.array == 4)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(source / "dataset.json", out / "dataset.json")
    stem = name[: -len(".nii.gz")]
    for folder in ("imagesTr", "labelsTr", "cleanTr", "healthyTr"):
        for path in sorted((source / folder).glob(f"{stem}*")):
            (slab,), _ = cut_slab([read_volume(path)], z, depth)
            (out / folder).mkdir(exist_ok=True)
            write_volume(slab if folder != "labelsTr" else slab.with_array(np.rint(slab.array).astype(np.uint8)),
                         out / folder / path.name)
    return out
