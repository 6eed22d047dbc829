"""Logic of the Fine-tune and Text-to-image panels (issue 13), on MRML only (no Qt).

Fine-tune: a folder of captioned images, or scalar volumes of the scene (each volume's slices
along K with one caption per volume) -> ``diffusion-mic text2image finetune`` as a background
process with progress and cancel -> the new adapter or model folder in `modelsDir`, where
`models()` lists it for the Text-to-image panel. Text-to-image: ``diffusion-mic text2image
generate`` in the background -> one scalar volume node per image (a single-slice volume),
grouped in a subject-hierarchy folder named after the prompt. The Widget polls `job.poll()`
from a timer; the console can call the blocking `fineTune()` and `generate()`.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

import slicer

from . import catalog, mrml
from .backend import BackendError, BackendProcess

METHODS = ("lora", "dreambooth", "hypernetwork", "embedding")
BASE_CARD = "text2image.json"
ADAPTER_CARD = "adapter.json"


class Text2ImageJob:
    """One background run: `poll()` never blocks, `cancel()` ends it and removes what it was writing."""

    def __init__(self, kind: str, process: BackendProcess, out: Path, workDir: Path):
        self.kind, self.process, self.out, self.workDir = kind, process, out, workDir

    @property
    def progress(self) -> dict:
        return self.process.progress

    def poll(self) -> bool:
        return self.process.poll()

    def wait(self, timeout: float | None = None, idle: Callable[[], None] | None = None) -> int:
        return self.process.wait(timeout=timeout, idle=idle)

    def cancel(self) -> None:
        """End the run without blocking: the process is stopped in the background and, once it
        has exited, its temporary and partial folders are removed."""
        partial = self.out.with_name(f".{self.out.name}.partial")

        def removeFolders() -> None:
            self.cleanup()
            shutil.rmtree(partial, ignore_errors=True)
        self.process.cancel(onReaped=removeFolders)

    def cleanup(self) -> None:
        shutil.rmtree(self.workDir, ignore_errors=True)


class Text2ImageLogic:
    """Fine-tune and text-to-image through the library's command line.

    modelsDir: where fine-tuned models are written and found (default: the user cache's
    ``text2image`` folder); python: the interpreter that runs DiffusionMICLib (default: this one,
    PythonSlicer inside Slicer).
    """

    def __init__(self, modelsDir: str | os.PathLike | None = None, python: str | None = None):
        self.modelsDir = Path(modelsDir) if modelsDir else catalog.cacheDir() / "text2image"
        self.pythonExecutable = python

    # ---- backend -------------------------------------------------------------------------------

    def python(self) -> str:
        if self.pythonExecutable:
            return self.pythonExecutable
        found = shutil.which("PythonSlicer") if hasattr(slicer, "app") else None
        return found or sys.executable

    def backendEnvironment(self) -> dict[str, str]:
        root = catalog.libraryRoot()
        if root is None:
            raise RuntimeError("DiffusionMICLib was not found next to the DiffusionMIC module")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(root)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env.update(PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
        return env

    def _start(self, kind: str, args: list[str], out: Path, workDir: Path,
               onProgress: Callable[[dict], None] | None) -> Text2ImageJob:
        command = [self.python(), "-m", "DiffusionMICLib", "text2image", *args, "--progress", "json"]
        process = BackendProcess(command, env=self.backendEnvironment(), cwd=str(workDir), onProgress=onProgress)
        return Text2ImageJob(kind, process, out, workDir)

    # ---- models --------------------------------------------------------------------------------

    def models(self) -> list[dict[str, Any]]:
        """The bases and adapters in modelsDir: name, path, kind (base, dreambooth, adapter), method, base."""
        found = []
        for folder in sorted(p for p in self.modelsDir.glob("*") if p.is_dir() and not p.name.startswith(".")):
            for cardName in (ADAPTER_CARD, BASE_CARD):
                if (folder / cardName).is_file():
                    try:
                        card = json.loads((folder / cardName).read_text(encoding="utf-8"))
                    except (OSError, ValueError):
                        break
                    tuned = card if cardName == ADAPTER_CARD else card.get("finetune") or {}
                    kind = "adapter" if cardName == ADAPTER_CARD else ("dreambooth" if tuned else "base")
                    found.append({"name": folder.name, "path": str(folder), "kind": kind,
                                  "method": tuned.get("method"), "base": tuned.get("base")})
                    break
        return found

    def resolve(self, model: str | os.PathLike) -> Path:
        """A model folder (or single-file checkpoint) for a path or a name listed by models()."""
        path = Path(model)
        if path.exists():
            return path
        if (self.modelsDir / str(model)).is_dir():
            return self.modelsDir / str(model)
        raise ValueError(f"text-to-image model '{model}' was not found (neither a path nor in {self.modelsDir})")

    # ---- fine-tune -----------------------------------------------------------------------------

    @staticmethod
    def exportVolumes(volumeNodes: list, captions: list[str], folder: str | os.PathLike, every: int = 1) -> int:
        """Slices along K of each scalar volume as 8-bit PNG, captioned in metadata.jsonl (one caption per volume).

        Each volume is scaled by the 99.5th percentile of its non-zero voxels; empty slices are skipped.
        """
        from PIL import Image
        if len(volumeNodes) != len(captions) or not volumeNodes:
            raise ValueError("give one caption for each volume")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for v, (node, caption) in enumerate(zip(volumeNodes, captions)):
            if not caption.strip():
                raise ValueError(f"volume '{node.GetName()}' has no caption")
            mrml.dimensions(node)     # one clear error for a volume without voxels
            a = slicer.util.arrayFromVolume(node).astype(np.float32)
            nonzero = a[a > 0]
            scale = float(np.percentile(nonzero, 99.5)) if nonzero.size else 1.0
            for k in range(0, a.shape[0], every):
                if not (a[k] > 0).any():
                    continue
                img = (np.clip(a[k] / scale, 0, 1) * 255).round().astype(np.uint8)
                name = f"volume{v:02d}_k{k:03d}.png"
                Image.fromarray(img).save(folder / name)
                rows.append({"file_name": name, "text": caption.strip()})
        if not rows:
            raise ValueError("the volumes have no non-zero slices")
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return len(rows)

    def startFineTune(self, base: str, method: str, name: str, *, dataDir: str | None = None,
                      volumeNodes: list | None = None, captions: list[str] | None = None, maxSteps: int = 400,
                      rank: int = 4, priorImages: int = 0, token: str | None = None, seed: int = 0,
                      onProgress: Callable[[dict], None] | None = None) -> Text2ImageJob:
        """Start fine-tuning `base` on a folder or on scene volumes; the result becomes modelsDir/name."""
        if method not in METHODS:
            raise ValueError(f"unknown method '{method}' (choose {', '.join(METHODS)})")
        if (dataDir is None) == (volumeNodes is None):
            raise ValueError("give either an image folder or volumes from the scene")
        if not name or Path(name).name != name or name.startswith("."):
            raise ValueError(f"'{name}' is not a plain folder name")
        out = self.modelsDir / name
        if out.exists():
            raise ValueError(f"a model named '{name}' exists already in {self.modelsDir}")
        basePath = self.resolve(base)
        workDir = Path(tempfile.mkdtemp(prefix="DiffusionMIC-t2i-"))
        try:
            if volumeNodes is not None:
                dataDir = str(workDir / "images")
                self.exportVolumes(volumeNodes, captions or [], dataDir)
            self.modelsDir.mkdir(parents=True, exist_ok=True)
            args = ["finetune", "--base", str(basePath), "--data", str(dataDir), "--method", method, "--out", str(out),
                    "--max-steps", str(maxSteps), "--rank", str(rank), "--prior-images", str(priorImages),
                    "--seed", str(seed)] + (["--token", token] if token else [])
            return self._start("finetune", args, out, workDir, onProgress)
        except BaseException:
            shutil.rmtree(workDir, ignore_errors=True)
            raise

    def finishFineTune(self, job: Text2ImageJob) -> dict[str, Any]:
        """The result of a finished fine-tune (its folder is then listed by models()); BackendError if it failed."""
        try:
            return job.process.result()
        finally:
            job.cleanup()

    def fineTune(self, base: str, method: str, name: str, timeout: float | None = None, **kwargs) -> dict[str, Any]:
        job = self.startFineTune(base, method, name, **kwargs)
        job.wait(timeout=timeout)
        return self.finishFineTune(job)

    # ---- text to image -------------------------------------------------------------------------

    def startGenerate(self, base: str, prompt: str, *, adapter: str | None = None, count: int = 1, seed: int = 0,
                      steps: int = 20, guidance: float = 3.0,
                      onProgress: Callable[[dict], None] | None = None) -> Text2ImageJob:
        if not prompt.strip():
            raise ValueError("the prompt is empty")
        basePath = self.resolve(base)
        workDir = Path(tempfile.mkdtemp(prefix="DiffusionMIC-t2i-"))
        out = workDir / "images"
        args = ["generate", "--base", str(basePath), "--prompt", prompt, "--count", str(count), "--seed", str(seed),
                "--steps", str(steps), "--guidance", str(guidance), "--out", str(out)]
        if adapter:
            args += ["--adapter", str(self.resolve(adapter))]
        try:
            return self._start("generate", args, out, workDir, onProgress)
        except BaseException:
            shutil.rmtree(workDir, ignore_errors=True)
            raise

    def finishGenerate(self, job: Text2ImageJob, prompt: str | None = None) -> list:
        """The generated images as new scalar volume nodes in a subject-hierarchy folder; none if it failed."""
        staging = mrml.Staging()
        try:
            result = job.process.result()
            label = (prompt or result.get("prompt") or "text2image")[:40]
            nodes = []
            for fileName in result["files"]:
                if fileName.endswith(".nrrd"):
                    source = mrml.readVolume(str(job.out / fileName))
                    name = f"{label} seed {fileName.split('seed')[-1][:-5]}"
                    nodes.append(mrml.commitVolume(staging, source, name))
            self._group(nodes, label)
            return nodes
        except BaseException:
            staging.rollback()
            raise
        finally:
            job.cleanup()

    @staticmethod
    def _group(nodes: list, label: str) -> None:
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        if sh is None or not nodes:
            return
        folder = sh.CreateFolderItem(sh.GetSceneItemID(), f"Text to image: {label}")
        for node in nodes:
            item = sh.GetItemByDataNode(node) or sh.CreateItem(folder, node)
            sh.SetItemParent(item, folder)

    def generate(self, base: str, prompt: str, timeout: float | None = None, **kwargs) -> list:
        job = self.startGenerate(base, prompt, **kwargs)
        job.wait(timeout=timeout)
        return self.finishGenerate(job, prompt)


__all__ = ["BackendError", "METHODS", "Text2ImageJob", "Text2ImageLogic"]
