"""The module's task panels as a table, and what a panel shows for a chosen model.

Plain Python (no Qt, no MRML): the Widget renders what these functions return, so that the
panel logic (how many input selectors, their labels, which volume goes where, the run
options) is tested on its own. A new panel is one more row of PANELS plus its .ui section.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from . import catalog


@dataclass(frozen=True)
class Panel:
    """One task panel: the model's task, its title, what it takes and what it makes."""

    task: str
    title: str
    takesInputs: bool = True
    unnamedInput: bool = True             # a card naming no inputs gets one unnamed selector
    outputClass: str = "vtkMRMLScalarVolumeNode"
    extraOptions: tuple[str, ...] = ()    # parameter-node fields passed to Logic.start by name
    feedsCompare: bool = True             # a finished run fills the Compare panel
    showsScore: bool = False              # the result's score goes into <task>ScoreLabel
    alsoLists: tuple[str, ...] = ()       # other tasks whose models the panel offers too


PANELS: tuple[Panel, ...] = (
    # generate: no input, or the label map of a model trained from label maps (card inputs ["labels"]),
    # or an optional lesion mask for a model with a lesion map (card training "lesion_map")
    Panel("generate", "Generate", unnamedInput=False, extraOptions=("count", "condition", "lesionLoad"),
          feedsCompare=False),
    Panel("translate", "Modality conversion"),
    Panel("segment", "Segment", outputClass="vtkMRMLSegmentationNode"),
    Panel("denoise", "Denoise", extraOptions=("adapt",)),
    # anomaly: also a segmenter against a folder of healthy subjects (the tissue atlas, `run anomaly --healthy`)
    Panel("anomaly", "Anomaly detection", showsScore=True, extraOptions=("healthy",), alsoLists=("segment",)),
)
TASKS: tuple[str, ...] = tuple(p.task for p in PANELS)
LABELS = "labels"      # the card's input name for a label map (DiffusionMICLib.models.LABEL_INPUT)
LESIONS = "lesions"    # the optional lesion mask of a lesion-map generator
ATLAS = "Tissue atlas against healthy subjects: "   # how the anomaly panel describes a segmenter


def chosenFolder(path) -> str:
    """The folder of a path field ("" when none is chosen: the wrapper's empty Path reads ".")."""
    text = "" if path is None else str(path)
    return "" if text in ("", ".") else text


def panel(task: str) -> Panel:
    for p in PANELS:
        if p.task == task:
            return p
    raise KeyError(f"no panel for task {task!r}")


def modelEntries(p: Panel, models: Callable[[str], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The entries a panel's model selector lists: the task's models (`models(task)`), then those of
    the tasks it also lists, their description saying what they do there."""
    entries = list(models(p.task))
    for task in p.alsoLists:
        entries += [dict(e, description=ATLAS + (e.get("description") or "")) for e in models(task)]
    return entries


@dataclass(frozen=True)
class InputSlot:
    """One input selector: its position in the model's inputs and the contrast it expects."""

    index: int
    contrast: str          # the card's input name ("T1", "FLAIR", ...); "" if the card names none
    optional: bool = False

    @property
    def isLabelMap(self) -> bool:
        return self.contrast in (LABELS, LESIONS)

    @property
    def label(self) -> str:
        if self.contrast == LESIONS:
            return "Lesion mask (optional):"
        if self.isLabelMap:
            return "Label map:"
        return f"Input ({self.contrast}):" if self.contrast else "Input volume:"

    @property
    def toolTip(self) -> str:
        if self.contrast == LESIONS:
            return ("Where to draw lesions (condition 'lesion'): a label map or a segmentation, every segment a "
                    "lesion; none: the model draws one of its training subjects' lesion maps")
        if self.isLabelMap:
            return ("The label map to draw images for (the labels the model was trained with), or a segmentation "
                    "whose segments are named as those labels")
        if self.contrast:
            return f"The {self.contrast} volume (input {self.index + 1} of the model)"
        return "The input volume"


@dataclass(frozen=True)
class ModelView:
    """What a panel shows for one model (or none)."""

    slots: tuple[InputSlot, ...]
    conditions: tuple[str, ...] = ()       # class-conditional generators: the classes
    lesionLoad: bool = False               # a lesion-map generator: takes a lesion load (mL)
    healthy: bool = False                  # a segmenter in the anomaly panel: needs a healthy cohort
    info: str = ""
    toolTip: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)


def inputSlots(p: Panel, card: dict[str, Any] | None) -> tuple[InputSlot, ...]:
    """One slot per input the model's card names (any number); one unnamed slot without a card
    (none for a panel without unnamedInput)."""
    if not p.takesInputs:
        return ()
    names = [str(n) for n in (card or {}).get("inputs") or []]
    if ((card or {}).get("training") or {}).get("lesion_map"):
        return (InputSlot(0, LESIONS, optional=True),)
    if not names:
        return (InputSlot(0, ""),) if p.unnamedInput else ()
    return tuple(InputSlot(i, name) for i, name in enumerate(names))


def describeModel(p: Panel, model: str, card: dict[str, Any] | None) -> ModelView:
    """Input slots, condition choices, info text, tooltip and sampling defaults for `model`."""
    if not model:
        info = f"No {p.task} model in the catalog yet."
        return ModelView(inputSlots(p, None), info=info, toolTip="No model: add one to the catalog or choose a folder",
                         defaults=catalog.cardDefaults(None))
    healthy = "healthy" in p.extraOptions and (card or {}).get("task") in p.alsoLists
    info = (card or {}).get("description", "")
    if healthy:
        info = (ATLAS + info + " It marks tissue where the healthy subjects (a data set folder, nnU-Net layout, "
                "same contrasts), each registered onto the input, have none.")
    return ModelView(inputSlots(p, card), tuple((card or {}).get("classes") or ()),
                     lesionLoad=bool(((card or {}).get("training") or {}).get("lesion_map")), healthy=healthy,
                     info=info, toolTip=catalog.cardTooltip(card, model), defaults=catalog.cardDefaults(card))


def _words(name: str) -> list[str]:
    return [w.lower() for w in re.split(r"[\s_\-.]+", name) if w]


def matchInputs(slots: Iterable[InputSlot], volumes: list[tuple[str, Any]], current: list[Any] | None = None,
                labelMaps: list[tuple[str, Any]] = ()) -> list:
    """A volume for each slot: the current choice if there is one, else the volume whose name
    ends with the slot's contrast ("... T1"), else one whose name holds it as a word; unnamed
    slots take the first volume, a label-map slot the first label map, an optional slot none. `volumes` and
    `labelMaps` are [(name, node)] in scene order."""
    current = list(current or [])
    chosen = []
    for slot in slots:
        node = current[slot.index] if slot.index < len(current) else None
        if node is None and slot.optional:
            pass                                # chosen by the user only
        elif node is None and slot.isLabelMap:
            node = labelMaps[0][1] if labelMaps else None
        elif node is None and slot.contrast:
            wanted = slot.contrast.lower()
            last = [v for n, v in volumes if _words(n)[-1:] == [wanted]]
            anywhere = [v for n, v in volumes if wanted in _words(n)]
            node = (last or anywhere or [None])[0]
        elif node is None and not slot.contrast and volumes:
            node = volumes[0][1]
        chosen.append(node)
    return chosen


def carryInputs(oldSlots: Iterable[InputSlot], oldNodes: list, newSlots: Iterable[InputSlot]) -> list:
    """When another model is chosen: each new slot keeps the volume chosen for the same contrast."""
    byContrast = {slot.contrast: node for slot, node in zip(oldSlots, oldNodes) if node is not None}
    return [byContrast.get(slot.contrast) for slot in newSlots]


def runOptions(p: Panel, sampling: dict[str, Any], extras: dict[str, Any], device: str,
               view: ModelView | None = None) -> dict[str, Any]:
    """Keyword arguments of Logic.start for a panel's current parameters (the healthy folder only
    for a model that takes one: `view.healthy`)."""
    options = {key: sampling[key] for key in catalog.FALLBACK_DEFAULTS}
    options["device"] = device
    for name in p.extraOptions:
        value = extras.get(name)
        if name == "healthy":
            value = chosenFolder(value) if view is not None and view.healthy else None
        options[name] = None if value == "" else value
    return options


def canApply(p: Panel, model: str, inputs: list, slots: tuple[InputSlot, ...], needsHealthy: bool = False,
             healthy=None) -> tuple[bool, str]:
    """Whether Apply can run with `inputs` for the model's `slots` (and a `healthy` folder when the model
    `needsHealthy` one), and the button's tooltip saying why not."""
    if not model:
        return False, "Choose a model"
    required = [i for i, slot in enumerate(slots) if not slot.optional]
    if any(i >= len(inputs) or inputs[i] is None for i in required):
        return False, "Choose the label map" if any(s.isLabelMap for s in slots) else "Choose the input volume(s)"
    if needsHealthy and not chosenFolder(healthy):
        return False, "Choose the folder of healthy subjects (a data set with the same contrasts)"
    return True, f"Run {p.title}"
