"""Progress reporting (tqdm bar, JSON lines for the Slicer module, or a callback) and cancel."""
from __future__ import annotations

import json
import sys
from typing import Callable

from tqdm import tqdm

from .errors import Cancelled

ProgressCallback = Callable[[str, int, int], None]   # (stage, step, steps)


class Progress:
    """Counts steps of named stages and reports them; `cancel()` is polled between steps."""

    def __init__(self, mode: str = "none", callback: ProgressCallback | None = None,
                 cancel: Callable[[], bool] | None = None, stream=None):
        if mode not in ("none", "tqdm", "json"):
            raise ValueError(f"unknown progress mode {mode!r}")
        self.mode = mode
        self.callback = callback
        self.cancel = cancel or (lambda: False)
        self.stream = stream or sys.stderr
        self._bar: tqdm | None = None
        self.stage_name = ""
        self.step = 0
        self.steps = 0

    def start(self, stage: str, steps: int, done: int = 0) -> None:
        """A new stage of `steps` steps, `done` of them already (a resumed training)."""
        self.close()
        self.stage_name, self.step, self.steps = stage, done, max(0, steps)
        if self.mode == "tqdm":
            self._bar = tqdm(total=self.steps or None, initial=done, desc=stage, file=self.stream, dynamic_ncols=True)
        self._report()

    def advance(self, n: int = 1, **info) -> None:
        """Count n steps done; raises Cancelled if the user asked to stop."""
        if self.cancel():
            raise Cancelled("cancelled")
        self.step += n
        if self._bar is not None:
            if self._bar.total != self.steps:
                self._bar.total = self.steps
            self._bar.update(n)
            if info:
                self._bar.set_postfix(info)
        self._report(**info)

    def _report(self, **info) -> None:
        if self.callback is not None:
            self.callback(self.stage_name, self.step, self.steps)
        if self.mode == "json":
            line = {"stage": self.stage_name, "step": self.step, "steps": self.steps,
                    "fraction": round(self.step / max(1, self.steps), 4), **info}
            print(json.dumps(line), file=sys.stdout, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def as_progress(progress: Progress | ProgressCallback | None, cancel: Callable[[], bool] | None = None) -> Progress:
    """Accept a Progress, a plain callback(stage, step, steps), or nothing."""
    if isinstance(progress, Progress):
        if cancel is not None:
            progress.cancel = cancel
        return progress
    return Progress("none", callback=progress, cancel=cancel)
