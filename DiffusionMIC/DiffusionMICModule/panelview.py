"""The Qt widgets of one task panel, filled as panels.describeModel() says (Slicer's application only).

The model selector lists the catalog's models of the task; the input selectors are built here,
one per input the chosen model's card names, labelled with its contrast, and kept in step with
the parameter node's <task>Inputs list.
"""
from __future__ import annotations

import os
from typing import Callable

import slicer

from . import catalog, panels
from .compat import qt
from .compat import tr as _


class Blocked:
    """Block a Qt object's signals inside a `with` block."""

    def __init__(self, obj):
        self.obj = obj

    def __enter__(self):
        self.wasBlocked = self.obj.blockSignals(True)

    def __exit__(self, *exc):
        self.obj.blockSignals(self.wasBlocked)


class PanelView:
    def __init__(self, panel: panels.Panel, ui, readCard: Callable[[str], dict | None]):
        self.panel = panel
        self.task = panel.task
        self.ui = ui
        self.readCard = readCard
        self.combo = self.widget("ModelComboBox")
        self.slots: tuple[panels.InputSlot, ...] = ()
        self.modelView = panels.ModelView(())   # what show() last showed
        self.selectors: list = []          # (QLabel, qMRMLNodeComboBox) per slot
        self.onInputChanged: Callable[[int, object], None] | None = None

    def widget(self, name: str, default=None):
        return getattr(self.ui, f"{self.task}{name}", default)

    # ---- model selector ---------------------------------------------------------------------

    def _addModel(self, name: str, data: str, description: str) -> None:
        self.combo.addItem(name, data)
        self.combo.setItemData(self.combo.count - 1, catalog.cardTooltip(self.readCard(data), description),
                               qt.Qt.ToolTipRole)

    def populate(self, entries: list[dict], current: str) -> None:
        """The catalog's models of the task (description as tooltip), a folder chosen earlier, and
        "Choose a model folder..."."""
        with Blocked(self.combo):
            self.combo.clear()
            for entry in entries:   # catalog models by name, fine-tuned ones by their folder
                self._addModel(entry["name"], entry.get("path", entry["name"]), entry.get("description", ""))
            if current and self.combo.findData(current) < 0:
                self._addModel(os.path.basename(str(current).rstrip("/\\")) or current, current, current)
            self.combo.addItem(_("Choose a model folder..."), "")

    def chosenModel(self) -> str | None:
        """The selector's model; for "Choose a model folder..." ask for one (None if none chosen)."""
        model = self.combo.currentData
        if model != "":
            return model
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Model folder (with model.json)"))
        if not folder or not os.path.isfile(os.path.join(folder, catalog.CARD)):
            if folder:
                slicer.util.errorDisplay(_("'{folder}' holds no model.json.").format(folder=folder))
            return None
        with Blocked(self.combo):
            self.combo.removeItem(self.combo.count - 1)
            self._addModel(os.path.basename(folder), folder, folder)
            self.combo.addItem(_("Choose a model folder..."), "")
        return folder

    def selectModel(self, pn, model: str) -> None:
        """Store the model; its card's defaults become the sampling parameters, and each input
        keeps the volume chosen for the same contrast."""
        view = panels.describeModel(self.panel, model, self.readCard(model))
        with slicer.util.NodeModify(pn):
            setattr(pn, f"{self.task}Model", model)
            for key, value in view.defaults.items():
                pn.setValue(f"{self.task}.{key}", value)
            if self.panel.takesInputs:
                inputs = list(getattr(pn, f"{self.task}Inputs"))
                setattr(pn, f"{self.task}Inputs", panels.carryInputs(self.slots, inputs, view.slots))

    # ---- showing the parameter node -----------------------------------------------------------

    def show(self, pn) -> bool:
        """Show the parameter node's model; False if the parameter node had to be changed first
        (a default model or input was filled in; it is shown on the Modified event that follows)."""
        model = getattr(pn, f"{self.task}Model")
        if not model and self.combo.count > 1:   # the task's first catalog model
            self.selectModel(pn, self.combo.itemData(0))
            return False
        view = self.modelView = panels.describeModel(self.panel, model, self.readCard(model))
        with Blocked(self.combo):
            self.combo.currentIndex = self.combo.findData(model) if model else -1
        self.combo.toolTip = view.toolTip
        self.widget("ModelInfoLabel").text = view.info
        conditions = self.widget("ConditionComboBox")
        if conditions is not None:
            with Blocked(conditions):
                if [conditions.itemData(i) for i in range(conditions.count)] != ["", *view.conditions]:
                    conditions.clear()
                    conditions.addItem(_("(none)"), "")
                    for name in view.conditions:
                        conditions.addItem(name, name)
                conditions.currentIndex = max(conditions.findData(getattr(pn, f"{self.task}Condition") or ""), 0)
            conditions.enabled = bool(view.conditions)
        lesionLoad = self.widget("LesionLoadSpinBox")
        if lesionLoad is not None:
            lesionLoad.enabled = view.lesionLoad
        healthy = self.widget("HealthyPathLineEdit")
        if healthy is not None:
            healthy.enabled = view.healthy
        return self._showInputs(pn, view.slots) if self.panel.takesInputs else True

    def _buildSelectors(self, slots) -> None:
        layout = self.widget("InputsWidget").layout()
        for label, selector in self.selectors:
            for w in (label, selector):
                layout.removeWidget(w)
                w.deleteLater()
        self.selectors = []
        for slot in slots:
            selector = slicer.qMRMLNodeComboBox()
            if slot.isLabelMap:     # or a segmentation whose segments are named as the model's labels
                selector.nodeTypes = ["vtkMRMLLabelMapVolumeNode", "vtkMRMLSegmentationNode"]
            else:
                selector.nodeTypes = ["vtkMRMLScalarVolumeNode"]
                selector.showChildNodeTypes = False   # no label maps
            selector.selectNodeUponCreation = selector.addEnabled = selector.removeEnabled = False
            selector.noneEnabled = True
            selector.setMRMLScene(slicer.mrmlScene)
            selector.toolTip = slot.toolTip
            selector.connect("currentNodeChanged(vtkMRMLNode*)",
                             lambda node, i=slot.index: self.onInputChanged and self.onInputChanged(i, node))
            label = qt.QLabel(slot.label)
            layout.addRow(label, selector)
            self.selectors.append((label, selector))
        self.slots = slots

    def _showInputs(self, pn, slots) -> bool:
        if slots != self.slots:
            self._buildSelectors(slots)
        current = list(getattr(pn, f"{self.task}Inputs"))
        nodes = slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
        volumes = [(n.GetName(), n) for n in nodes if not n.IsA("vtkMRMLLabelMapVolumeNode")]
        labelMaps = [(n.GetName(), n) for n in nodes if n.IsA("vtkMRMLLabelMapVolumeNode")] + [
            (n.GetName(), n) for n in slicer.util.getNodesByClass("vtkMRMLSegmentationNode")]
        chosen = panels.matchInputs(slots, volumes, current, labelMaps)
        if chosen != current:
            setattr(pn, f"{self.task}Inputs", chosen)
            return False
        for (label, selector), node in zip(self.selectors, chosen):
            with Blocked(selector):
                selector.setCurrentNode(node)
        return True

    def setInput(self, pn, index: int, node) -> None:
        """A selector's choice into the parameter node."""
        inputs = list(getattr(pn, f"{self.task}Inputs"))
        inputs += [None] * (index + 1 - len(inputs))
        inputs[index] = node
        setattr(pn, f"{self.task}Inputs", inputs)
