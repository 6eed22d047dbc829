"""The five tasks; each file holds only what is specific to its task."""
from __future__ import annotations

from ..errors import DiffusionMICError
from .anomaly import Anomaly
from .base import RunOptions, RunResult, Task
from .denoise import Denoise
from .generate import Generate
from .segment import Segment
from .translate import Translate

TASKS: dict[str, Task] = {t.name: t for t in (Denoise(), Translate(), Segment(), Anomaly(), Generate())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise DiffusionMICError(f"unknown task {name!r}; use one of {', '.join(TASKS)}")
    return TASKS[name]


__all__ = ["RunOptions", "RunResult", "Task", "TASKS", "get_task"]
