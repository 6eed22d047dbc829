"""The Fine-tune and Text-to-image panels' Qt widgets (Slicer's application only).

text2imagepanel.py says what they list, when Apply can run and what it sends; this fills the
selectors the parameter node wrapper cannot bind (models found on disk, checked volumes), turns
Apply into Cancel while a run goes, and polls the runs from a qt.QTimer.
"""
from __future__ import annotations

import os
from typing import Callable

import slicer

from . import install
from . import text2imagepanel as tp
from .compat import qt
from .compat import tr as _
from .panelview import Blocked

CHOOSE = "<choose>"       # the selectors' last item: "Choose a model folder..."


class Text2ImagePanels:
    POLL_MS = 200

    def __init__(self, ui, taskLogic, textLogic, onModelsChanged: Callable[[], None]):
        self.ui, self.taskLogic, self.textLogic = ui, taskLogic, textLogic
        self.onModelsChanged = onModelsChanged     # a fine-tune finished: every panel lists its models again
        self.pn = None                             # the module's parameter node, set by the Widget
        self.textModels: list[dict] = []           # read from disk by populate(), not on every change
        self.taskModels: dict[str, list[dict]] = {}
        self.runs: dict[str, tp.PanelRun] = {}
        self.timer = qt.QTimer()
        self.timer.setInterval(self.POLL_MS)
        self.timer.connect("timeout()", self.poll)
        for combo, field in ((ui.fineTuneBaseComboBox, "fineTuneBase"), (ui.text2imageBaseComboBox, "text2imageBase"),
                             (ui.text2imageAdapterComboBox, "text2imageAdapter")):
            combo.connect("currentIndexChanged(int)", lambda index, c=combo, f=field: self._onChosen(c, f))
        ui.fineTuneVolumesComboBox.connect("checkedNodesChanged()", self._onVolumesChecked)
        ui.fineTuneApplyButton.connect("clicked(bool)", lambda checked: self.toggle("fineTune"))
        ui.text2imageApplyButton.connect("clicked(bool)", lambda checked: self.toggle("text2image"))
        ui.fineTuneProgressBar.hide()
        ui.text2imageProgressBar.hide()
        ui.fineTuneBaseComboBox.toolTip = ui.text2imageBaseComboBox.toolTip = _(
            "Text-to-image models in {folder}, or a folder you choose").format(folder=textLogic.modelsDir)

    def populate(self) -> None:
        """Read the models on disk again (at start, on "Reload model catalog", after a fine-tune)."""
        self.textModels, self.taskModels = self.textLogic.models(), {}
        self.show()

    # ---- selectors the wrapper cannot bind -----------------------------------------------------

    @staticmethod
    def _fill(combo, choices, current: str, chooser: bool) -> None:
        with Blocked(combo):
            combo.clear()
            for label, value in choices:
                combo.addItem(label, value)
            if current and combo.findData(current) < 0:   # a folder chosen earlier
                combo.addItem(os.path.basename(current.rstrip("/\\")) or current, current)
            if chooser:
                combo.addItem(_("Choose a model folder..."), CHOOSE)
            combo.currentIndex = combo.findData(current) if current else -1

    def _onChosen(self, combo, field: str) -> None:
        if self.pn is None:
            return
        value = combo.currentData
        if value == CHOOSE:
            value = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Model folder"))
            if not value:
                self.show()
                return
        setattr(self.pn, field, value or "")

    def _onVolumesChecked(self) -> None:
        if self.pn is not None:
            self.pn.fineTuneVolumes = list(self.ui.fineTuneVolumesComboBox.checkedNodes())

    # ---- showing the parameter node ------------------------------------------------------------

    def show(self) -> bool:
        """Fill the selectors from the models read and the parameter node; enable what applies.
        False if the parameter node had to be changed first (its Modified event shows it again)."""
        pn, ui = self.pn, self.ui
        if pn is None:
            return True
        kind = pn.fineTuneKind
        if kind != "text2image" and kind not in self.taskModels:
            self.taskModels[kind] = self.taskLogic.models(kind)
        choices = {"fineTuneBase": tp.baseChoices(kind, self.textModels, self.taskModels.get(kind, [])),
                   "text2imageBase": tp.baseChoices("text2image", self.textModels, []),
                   "text2imageAdapter": tp.adapterChoices(pn.text2imageBase, self.textModels, self.textLogic.resolve)}
        for field, listed in choices.items():
            if tp.keptChoice(getattr(pn, field), listed) != getattr(pn, field):
                setattr(pn, field, "")
                return False
        self._fill(ui.fineTuneBaseComboBox, choices["fineTuneBase"], pn.fineTuneBase, True)
        self._fill(ui.text2imageBaseComboBox, choices["text2imageBase"], pn.text2imageBase, True)
        self._fill(ui.text2imageAdapterComboBox, choices["text2imageAdapter"], pn.text2imageAdapter, False)
        volumes = ui.fineTuneVolumesComboBox
        with Blocked(volumes):
            for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
                volumes.setCheckState(node, qt.Qt.Checked if node in pn.fineTuneVolumes else qt.Qt.Unchecked)
        textToImage, fromVolumes = kind == "text2image", pn.fineTuneSource == "volumes"
        for widget in (ui.fineTuneMethodComboBox, ui.fineTuneTokenLineEdit, ui.fineTunePriorImagesSpinBox):
            widget.enabled = textToImage
        ui.fineTuneDataPathLineEdit.enabled = not fromVolumes
        ui.fineTuneVolumesComboBox.enabled = ui.fineTuneCaptionLineEdit.enabled = fromVolumes
        for panel, check in (("fineTune", tp.canFineTune), ("text2image", tp.canGenerate)):
            if panel not in self.runs:
                button = getattr(ui, f"{panel}ApplyButton")
                ready, why = check(pn)
                button.enabled, button.toolTip = ready, _(why)
        return True

    # ---- runs ----------------------------------------------------------------------------------

    def _setRunning(self, panel: str, running: bool) -> None:
        button, bar = getattr(self.ui, f"{panel}ApplyButton"), getattr(self.ui, f"{panel}ProgressBar")
        if running:
            button.text, button.toolTip, button.enabled = _("Cancel"), _("Stop the run; nothing is added"), True
            bar.value = 0
            bar.show()
        else:
            button.text = _("Apply")
            bar.hide()
            self.show()

    def toggle(self, panel: str) -> None:
        """Apply (start) or Cancel: the same button."""
        status = getattr(self.ui, f"{panel}StatusLabel")
        if panel in self.runs:
            self.runs.pop(panel).cancel()
            status.text = _("Cancelled.")
            self._setRunning(panel, False)
            return
        if not install.ensureDependencies():
            return
        with slicer.util.tryWithErrorDisplay(_("DiffusionMIC could not start."), waitCursor=True):
            if panel == "fineTune":
                self.runs[panel] = tp.startFineTune(self.pn, self.textLogic, self.taskLogic)
            else:
                self.runs[panel] = tp.startGenerate(self.pn, self.textLogic)
            status.text = _("Starting...")
            self._setRunning(panel, True)
            self.timer.start()

    def poll(self) -> None:
        for panel, run in list(self.runs.items()):
            done = run.poll()
            getattr(self.ui, f"{panel}ProgressBar").value = run.percent
            status = getattr(self.ui, f"{panel}StatusLabel")
            status.text = run.status
            if not done:
                continue
            del self.runs[panel]
            if run.error is not None:
                status.text = _("Failed.")
                slicer.util.errorDisplay(_("DiffusionMIC failed:\n{error}").format(error=run.error))
            elif panel == "fineTune":
                status.text = _("Done: the model '{name}' is in the model lists.").format(name=run.label)
                self.onModelsChanged()
            else:
                status.text = _("Done: {count} image(s) in the folder 'Text to image: {prompt}'.").format(
                    count=len(run.result), prompt=run.label[:40])
            self._setRunning(panel, False)
        if not self.runs:
            self.timer.stop()

    def cancelAll(self) -> None:
        """Cancel every run; returns at once."""
        for panel in list(self.runs):
            self.runs.pop(panel).cancel()
            self._setRunning(panel, False)
        self.timer.stop()
