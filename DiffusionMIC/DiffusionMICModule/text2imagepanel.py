"""The Fine-tune and Text-to-image panels without Qt: what their selectors list, whether Apply
can run, what Apply sends to the Logic, and the run the panel polls (text2imageview.py renders it).

Fine-tune covers both model families, chosen by its kind: "text2image" fine-tunes a text-to-image
base with Text2ImageLogic (a folder of captioned images, or scene volumes with one caption), a
task name fine-tunes that task's model with DiffusionMICLogic.startFineTune (a data set folder in
the nnU-Net layout). `pn` is the module's parameter node (its fineTune* and text2image* fields).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import slicer

from .compat import hasApp
from .panels import TASKS, chosenFolder
from .text2image import METHODS

FINETUNE_KINDS = ("text2image", *TASKS)
FINETUNE_SOURCES = ("folder", "volumes")
RANKED = ("lora", "hypernetwork")      # text-to-image methods that take --rank


def baseChoices(kind: str, textModels: list[dict], taskModels: list[dict]) -> list[tuple[str, str]]:
    """(label, value) for the model to fine-tune: text-to-image bases (DreamBooth folders are bases
    too) or the task's models (catalog names, fine-tuned folders by path)."""
    if kind == "text2image":
        return [(m["name"] + (" (DreamBooth)" if m["kind"] == "dreambooth" else ""), m["name"])
                for m in textModels if m["kind"] != "adapter"]
    return [(e["name"], e.get("path", e["name"])) for e in taskModels]


def keptChoice(value: str, choices: list[tuple[str, str]]) -> str:
    """`value` if the selector lists it or it is a folder chosen by hand; else "" (a model of the
    other family after the kind changed, an adapter of another base, a model gone from disk)."""
    return value if not value or value in [v for _, v in choices] or os.path.isdir(value) else ""


def adapterChoices(base: str, textModels: list[dict], resolve: Callable[[str], Path]) -> list[tuple[str, str]]:
    """("(none)", "") and the adapters trained on `base` (the library refuses an adapter on another base)."""
    choices = [("(none)", "")]
    try:
        basePath = Path(resolve(base)).resolve() if base else None
    except ValueError:
        basePath = None
    for m in textModels:
        if basePath and m["kind"] == "adapter" and m.get("base") and Path(m["base"]).resolve() == basePath:
            choices.append((f"{m['name']} ({m['method']})", m["name"]))
    return choices


def _plainName(name: str) -> bool:
    return bool(name) and Path(name).name == name and not name.startswith(".")


def canFineTune(pn) -> tuple[bool, str]:
    """Whether the Fine-tune panel's Apply can run, and the button's tooltip saying why not."""
    textToImage = pn.fineTuneKind == "text2image"
    if not pn.fineTuneBase:
        return False, "Choose the model to fine-tune"
    if not _plainName(pn.fineTuneName.strip()):
        return False, "Name the new model (a plain folder name)"
    if pn.fineTuneSource == "volumes":
        if not textToImage:
            return False, "Task models fine-tune on a data set folder (nnU-Net layout), not on scene volumes"
        if not [n for n in pn.fineTuneVolumes if n is not None]:
            return False, "Check the volumes to train on"
        if not pn.fineTuneCaption.strip():
            return False, "Write the caption of the volumes' slices"
    elif not chosenFolder(pn.fineTuneData):
        return False, "Choose the image folder" if textToImage else "Choose the data set folder"
    if textToImage and pn.fineTuneMethod in RANKED and pn.fineTuneRank < 1:
        return False, f"{pn.fineTuneMethod} needs a rank of at least 1"
    return True, f"Fine-tune {Path(pn.fineTuneBase).name} into '{pn.fineTuneName.strip()}'"


def fineTuneRequest(pn) -> tuple[str, dict[str, Any]]:
    """("text2image", keyword arguments of Text2ImageLogic.startFineTune) or
    ("task", keyword arguments of DiffusionMICLogic.startFineTune) for the panel's parameters."""
    name = pn.fineTuneName.strip()
    if pn.fineTuneKind != "text2image":
        return "task", {"task": pn.fineTuneKind, "model": pn.fineTuneBase, "dataDir": chosenFolder(pn.fineTuneData),
                        "name": name, "loraRank": pn.fineTuneRank, "maxSteps": pn.fineTuneMaxSteps}
    request = {"base": pn.fineTuneBase, "method": pn.fineTuneMethod, "name": name, "maxSteps": pn.fineTuneMaxSteps,
               "rank": pn.fineTuneRank, "priorImages": pn.fineTunePriorImages,
               "token": pn.fineTuneToken.strip() or None}
    if pn.fineTuneSource == "volumes":
        volumes = [n for n in pn.fineTuneVolumes if n is not None]
        request.update(volumeNodes=volumes, captions=[pn.fineTuneCaption.strip()] * len(volumes))
    else:
        request["dataDir"] = chosenFolder(pn.fineTuneData)
    return "text2image", request


def canGenerate(pn) -> tuple[bool, str]:
    if not pn.text2imageBase:
        return False, "Choose a text-to-image base"
    if not pn.text2imagePrompt.strip():
        return False, "Write a prompt"
    return True, "Generate images from the prompt"


def generateRequest(pn) -> dict[str, Any]:
    """Keyword arguments of Text2ImageLogic.startGenerate for the panel's parameters."""
    return {"base": pn.text2imageBase, "prompt": pn.text2imagePrompt.strip(), "adapter": pn.text2imageAdapter or None,
            "count": pn.text2imageCount, "seed": pn.text2imageSeed, "steps": pn.text2imageSteps,
            "guidance": pn.text2imageGuidance}


class PanelRun:
    """One run as its panel drives it: poll() from a timer (True once done; then `result` or
    `error`), cancel() stops it at once and leaves the scene and the models as they were."""

    def __init__(self, job, finish: Callable[[Any], Any], label: str = ""):
        self.job, self._finish, self.label = job, finish, label     # label: the new model's name, or the prompt
        self.done, self.result, self.error = False, None, None

    @property
    def percent(self) -> int:
        return int(round(100 * float(self.job.process.progress.get("fraction") or 0.0)))

    @property
    def status(self) -> str:
        p = self.job.process.progress
        stage = str(p.get("stage", ""))
        return f"{stage}: step {p.get('step', 0)} of {p.get('steps')}" if p.get("steps") else stage

    def poll(self) -> bool:
        if self.done:
            return True
        if not self.job.poll():
            return False
        self.done = True
        try:
            self.result = self._finish(self.job)
        except Exception as e:  # noqa: BLE001 - the panel shows it
            self.error = e
        return True

    def cancel(self) -> None:
        if not self.done:
            self.job.cancel()
            self.done = True


def startFineTune(pn, textLogic, taskLogic) -> PanelRun:
    """Start the Fine-tune panel's run; its result is the backend's JSON (the new model's folder)."""
    target, request = fineTuneRequest(pn)
    if target == "text2image":
        return PanelRun(textLogic.startFineTune(**request), textLogic.finishFineTune, request["name"])
    return PanelRun(taskLogic.startFineTune(**request), lambda job: job.wait().info, request["name"])


def startGenerate(pn, textLogic) -> PanelRun:
    """Start the Text-to-image panel's run; its result is the new volume nodes, the first one shown."""
    request = generateRequest(pn)

    def finish(job):
        nodes = textLogic.finishGenerate(job, request["prompt"])
        if nodes:
            slicer.util.setSliceViewerLayers(background=nodes[0], fit=hasApp())
        return nodes

    return PanelRun(textLogic.startGenerate(**request), finish, request["prompt"])
