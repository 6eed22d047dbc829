"""The DiffusionMICLib command line run as a background process, read without blocking.

Plain Python (no slicer, qt or vtk): the module's Logic drives it, and the Widget polls it
from a qt.QTimer so that Slicer stays responsive. The process follows the command-line
contract of DESIGN.md: with ``--progress json`` it prints one JSON object per line on stdout
(``{"stage", "step", "steps", "fraction"}``), then the result JSON; a failure exits non-zero
with one clear line on stderr.
"""
from __future__ import annotations

import atexit
import json
import os
import queue
import signal
import subprocess
import threading
import time
from typing import Any, Callable

__all__ = ["BackendError", "BackendProcess", "parseResult"]

_running: set["BackendProcess"] = set()   # started, not yet ended or reaped
_runningLock = threading.Lock()


class BackendError(RuntimeError):
    """The backend failed; the message is the backend's own last line on stderr."""


def _isProgress(obj: Any) -> bool:
    return isinstance(obj, dict) and "stage" in obj and "fraction" in obj


def parseResult(lines: list[str]) -> Any:
    """The result JSON among the stdout lines that are not progress lines.

    `run` prints the result on one line, `evaluate` and `models` print it indented over
    several lines: try the last line first, then all the non-progress text together.
    """
    text = [ln for ln in lines if ln.strip()]
    if not text:
        raise BackendError("the backend printed no result")
    for candidate in (text[-1], "\n".join(text)):
        try:
            return json.loads(candidate)
        except json.JSONDecodeError:
            continue
    # Something else was printed before the result (a library's warning on stdout):
    # the result is the longest tail of lines that parses.
    for start in range(len(text) - 1, -1, -1):
        try:
            return json.loads("\n".join(text[start:]))
        except json.JSONDecodeError:
            continue
    raise BackendError(f"cannot read the backend's result: {text[-1][:200]}")


class BackendProcess:
    """One run of ``python -m DiffusionMICLib ARGS...`` in its own process group.

    poll() never blocks: it hands the progress lines read so far to `onProgress` and returns
    True once the process has ended and all its output is read. cancel() ends the process and
    its children (the whole process group; on Windows the process tree) without blocking the
    caller: a background thread reaps them. At interpreter exit whatever is left is killed.
    """

    def __init__(self, command: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
                 onProgress: Callable[[dict], None] | None = None):
        self.command = list(command)
        self.onProgress = onProgress
        self.progress: dict = {"stage": "starting", "step": 0, "steps": 0, "fraction": 0.0}
        self.stdoutLines: list[str] = []    # everything that is not a progress line
        self.stderrLines: list[str] = []
        self.returncode: int | None = None
        self.cancelled = False
        self.startTime = time.monotonic()
        self._queue: queue.Queue = queue.Queue()
        self.reaped = threading.Event()     # set once the process is gone and its pipes closed
        self._killNow = threading.Event()
        kwargs: dict[str, Any] = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True   # its own process group: cancel reaches the children
        self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env, cwd=cwd, text=True, encoding="utf-8",
                                     errors="replace", bufsize=1, **kwargs)
        self._readers = [threading.Thread(target=self._read, args=(stream, name), daemon=True)
                         for stream, name in ((self.proc.stdout, "out"), (self.proc.stderr, "err"))]
        for t in self._readers:
            t.start()
        with _runningLock:
            _running.add(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self, stream, name: str) -> None:
        try:
            for line in iter(stream.readline, ""):
                self._queue.put((name, line.rstrip("\r\n")))
        except (OSError, ValueError):   # the pipe went away (cancel)
            pass
        finally:
            self._queue.put((name, None))

    def _drain(self) -> None:
        while True:
            try:
                name, line = self._queue.get_nowait()
            except queue.Empty:
                return
            if line is None:
                continue
            if name == "err":
                self.stderrLines.append(line)
                continue
            obj = None
            if line.startswith("{") and '"stage"' in line:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    obj = None
            if _isProgress(obj):
                self.progress = obj
                if self.onProgress is not None:
                    self.onProgress(obj)
            else:
                self.stdoutLines.append(line)

    def poll(self) -> bool:
        """Read what has arrived; True when the process has ended and everything is read."""
        self._drain()
        if self.returncode is not None:
            return True
        if self.proc.poll() is None:
            return False
        for t in self._readers:
            t.join(timeout=5)
        self._drain()
        self.returncode = self.proc.returncode
        if not self.cancelled:
            self._forget()
        return True

    def wait(self, timeout: float | None = None, interval: float = 0.05,
             idle: Callable[[], None] | None = None) -> int:
        """Block until the process ends (calling `idle` between polls); returns its exit code."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.poll():
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the backend did not finish within {timeout} s")
            if idle is not None:
                idle()
            time.sleep(interval)
        return self.returncode

    def errorMessage(self) -> str:
        """The backend's last non-empty stderr line (its one clear error line)."""
        for line in reversed(self.stderrLines):
            if line.strip():
                return line.strip()
        return f"the backend exited with code {self.returncode}"

    def result(self) -> Any:
        """The result JSON of a finished, successful run; BackendError otherwise."""
        if not self.poll():
            raise BackendError("the backend is still running")
        if self.cancelled:
            raise BackendError("cancelled")
        if self.returncode != 0:
            raise BackendError(self.errorMessage())
        return parseResult(self.stdoutLines)

    def cancel(self, grace: float = 3.0, onReaped: Callable[[], None] | None = None) -> None:
        """Stop the process and all its children; returns at once (the GUI never waits).

        SIGTERM goes to the process group now; a background thread gives it `grace` seconds,
        then kills whatever is left of the group, closes the pipes and calls `onReaped` (from
        that thread). `reaped` is set when all this is done.
        """
        if self.cancelled:
            return
        self.cancelled = True
        if os.name != "nt" and self.proc.poll() is None:
            self._signalGroup(terminate=True)
        threading.Thread(target=self._reap, args=(grace, onReaped), name=f"DiffusionMIC reaper {self.pid}",
                         daemon=True).start()

    def kill(self) -> None:
        """Kill the process group now (no grace); a pending cancel() finishes at once."""
        self.cancelled = True
        self._killNow.set()
        self._signalGroup(terminate=False)

    def _reap(self, grace: float, onReaped: Callable[[], None] | None) -> None:
        try:
            if os.name == "nt":
                self._signalGroup(terminate=True)
            deadline = time.monotonic() + grace
            while self.proc.poll() is None and time.monotonic() < deadline and not self._killNow.is_set():
                self._killNow.wait(0.05)
            # Kill whatever is left in the group (children that ignored SIGTERM, or orphans).
            self._signalGroup(terminate=False)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:   # unkillable (uninterruptible I/O): leave it to the OS
                pass
            for stream in (self.proc.stdout, self.proc.stderr):
                try:
                    stream.close()
                except (OSError, ValueError):
                    pass
            for t in self._readers:
                t.join(timeout=1)
        finally:
            self._forget()
            try:
                if onReaped is not None:
                    onReaped()
            finally:
                self.reaped.set()     # after onReaped: a waiter then sees its clean-up done

    def _forget(self) -> None:
        with _runningLock:
            _running.discard(self)

    def _signalGroup(self, terminate: bool) -> None:
        """SIGTERM (terminate) or SIGKILL to the process group; on Windows taskkill /F /T, which
        ends the process tree at once (PythonSlicer.exe is a launcher with a child)."""
        if os.name == "nt":
            if self.proc.poll() is None:
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.proc.pid)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM if terminate else signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@atexit.register
def _killLeftovers() -> None:
    """At exit (Slicer closing mid-run, or mid-cancel): no backend process may outlive us."""
    with _runningLock:
        left = list(_running)
    for process in left:
        process.kill()

