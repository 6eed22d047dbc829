"""Background runs of the library's command line, as the Logic hands them to the GUI or a script."""
from __future__ import annotations

import shutil
import time

import slicer

from .backend import BackendProcess
from .compat import hasApp


class DiffusionMICResult:
    """What a run put into the scene: `outputNode` (the main one), `nodes` by output name
    ("output", "uncertainty", "mask", ...), and `info`, the backend's result JSON."""

    def __init__(self, task, outputNode, nodes=None, info=None, inputNodes=None):
        self.task = task
        self.outputNode = outputNode
        self.nodes = dict(nodes or {})
        self.info = dict(info or {})
        self.inputNodes = list(inputNodes or [])

    def __repr__(self):
        return f"DiffusionMICResult({self.task}, {self.outputNode.GetName() if self.outputNode else None})"


class DiffusionMICCancelled(RuntimeError):
    pass


class DiffusionMICJob:
    """One background run. Poll it (the GUI's QTimer does) or wait() for it.

    Callbacks, all called on the thread that polls: onProgress(job) with job.fraction and
    job.status; onFinished(DiffusionMICResult) once the results are in the scene;
    onError(exception) if the backend or the import of its results failed. cancel() kills the
    process and its children and leaves the scene as it was.
    """

    def __init__(self, task, command, env, tempDir, finish, onProgress=None, onFinished=None, onError=None):
        self.task = task
        self.command = command
        self.tempDir = tempDir
        self._finish = finish
        self.onProgress, self.onFinished, self.onError = onProgress, onFinished, onError
        self.state = "running"      # running, finished, failed, cancelled
        self.result = None
        self.error = None
        self.process = BackendProcess(command, env=env, cwd=tempDir, onProgress=self._progress)

    @property
    def fraction(self) -> float:
        return float(self.process.progress.get("fraction") or 0.0)

    @property
    def status(self) -> str:
        p = self.process.progress
        if p.get("steps"):
            return f"{p.get('stage', '')}: step {p.get('step', 0)} of {p.get('steps')}"
        return str(p.get("stage", ""))

    def _progress(self, line) -> None:
        if self.onProgress is not None:
            self.onProgress(self)

    def poll(self) -> bool:
        """Read the backend's progress; once it has ended, bring the results in. True when done."""
        if self.state != "running":
            return True
        if not self.process.poll():
            return False
        try:
            self.result = self._finish(self.process.result())
            self.state = "finished"
        except Exception as e:  # noqa: BLE001 - handed to onError / raised by wait()
            self.error = e
            self.state = "failed"
        finally:
            self._removeTempDir()
        if self.state == "finished":
            if self.onFinished is not None:
                self.onFinished(self.result)
        elif self.onError is not None:
            self.onError(self.error)
        return True

    def wait(self, timeout=None):
        """Block until done; returns the DiffusionMICResult or raises the run's error."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not self.poll():
                if deadline is not None and time.monotonic() > deadline:
                    self.cancel()
                    raise TimeoutError(f"DiffusionMIC {self.task} did not finish within {timeout} s")
                if hasApp():
                    slicer.app.processEvents()
                time.sleep(0.05)
        except KeyboardInterrupt:
            self.cancel()
            raise
        if self.state == "failed":
            raise self.error
        if self.state == "cancelled":
            raise DiffusionMICCancelled(f"DiffusionMIC {self.task} was cancelled")
        return self.result

    def cancel(self) -> None:
        """Stop the run without waiting: the scene is left as it was; the backend is reaped and
        the temporary folder removed in the background (job.process.reaped is set then)."""
        if self.state != "running":
            return
        self.state = "cancelled"
        self.process.cancel(onReaped=self._removeTempDir)

    def _removeTempDir(self) -> None:
        if self.tempDir:
            shutil.rmtree(self.tempDir, ignore_errors=True)
