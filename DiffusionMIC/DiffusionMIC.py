"""DiffusionMIC: diffusion models for medical image computing in 3D Slicer.

One panel per task (generate, modality conversion, segment, denoise, anomaly detection) and a
Compare panel. The work is done by DiffusionMICLib's command line in a background process
(``PythonSlicer -m DiffusionMICLib run TASK ... --progress json``), so Slicer stays responsive;
results come back into the scene on the input's exact voxel grid.

The Logic (DiffusionMICLogic) needs no Qt: it also runs on slicer-core, outside Slicer.
"""
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from typing import Annotated, Union

import numpy as np
import vtk

import slicer
from slicer import (
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTableNode,
)

_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
# Helpers next to this file; DiffusionMICLib next to it (installed extension) or one folder up
# (source checkout: <repo>/DiffusionMIC/DiffusionMIC.py and <repo>/DiffusionMICLib).
if _MODULE_DIR not in sys.path:
    sys.path.insert(0, _MODULE_DIR)
for _root in (_MODULE_DIR, os.path.dirname(_MODULE_DIR)):
    if os.path.isfile(os.path.join(_root, "DiffusionMICLib", "__init__.py")):
        if _root not in sys.path:
            sys.path.insert(0, _root)
        break

from DiffusionMICModule import catalog, mrml  # noqa: E402
from DiffusionMICModule.backend import BackendError, BackendProcess  # noqa: E402

try:  # Slicer's application (Qt)
    import qt
    from slicer.i18n import tr as _
    from slicer.i18n import translate
    from slicer.ScriptedLoadableModule import (
        ScriptedLoadableModule,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
        ScriptedLoadableModuleWidget,
    )
    from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper, parameterPack
    from slicer.util import VTKObservationMixin
    HAVE_QT = True
except ImportError:  # slicer-core: real MRML, no Qt (tests, scripts outside Slicer)
    qt = None
    from DiffusionMICModule.compat import (  # noqa: F401
        Choice,
        ScriptedLoadableModule,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
        ScriptedLoadableModuleWidget,
        WithinRange,
        parameterNodeWrapper,
        parameterPack,
        translate,
    )
    from DiffusionMICModule.compat import tr as _
    VTKObservationMixin = object
    HAVE_QT = False

TASKS = ("generate", "translate", "segment", "denoise", "anomaly")
TASK_TITLES = {"generate": "Generate", "translate": "Modality conversion", "segment": "Segment",
               "denoise": "Denoise", "anomaly": "Anomaly detection"}
SAMPLERS = catalog.SAMPLERS
DEVICES = ["auto", "cpu", "cuda", "mps"]
MAX_INPUTS = 3          # input selectors per panel (translate/segment/anomaly models may take several)
ATTRIBUTE = "DiffusionMIC."


def resourcePath(filename: str = "") -> str:
    """Resources/ of the installed module (next to this file) or of the source checkout (one up)."""
    for base in (_MODULE_DIR, os.path.dirname(_MODULE_DIR)):
        folder = os.path.join(base, "Resources")
        if os.path.isdir(folder):
            return os.path.join(folder, filename)
    return os.path.join(_MODULE_DIR, "Resources", filename)


def _hasApp() -> bool:
    return HAVE_QT and hasattr(slicer, "app")


#
# DiffusionMIC
#


class DiffusionMIC(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DiffusionMIC")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Filtering"),
                                  translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []   # PyTorchUtils is used when present; a clear message otherwise
        self.parent.contributors = ["DiffusionMIC developers"]
        self.parent.helpText = _("""
Diffusion models for medical images, run on this computer: <b>generate</b> synthetic volumes,
<b>convert</b> between MRI contrasts (for example FLAIR from T1 and T2), <b>segment</b> with an
uncertainty map, <b>denoise</b>, and <b>detect anomalies</b> (a coloured map over the image, a
thresholded region and a score). Each panel: pick the input volume(s) and a model, press Apply.
Results appear next to the input in the Data module, on the input's exact voxel grid.
<b>Compare</b> shows an input and a result side by side with linked views and measures a result
against a reference (PSNR, SSIM, Dice, ...) into a table.
Models come from the DiffusionMIC model catalog or from a model folder you trained with
<code>diffusion-mic train</code>. The sample data set "DiffusionMIC brain phantom" is simulated
locally. Not for clinical use.
""")
        self.parent.acknowledgementText = _("""
DiffusionMIC builds on MONAI (networks, transforms, metrics), Hugging Face diffusers (noise
schedulers), PyTorch, SimpleITK and nilearn's MNI ICBM152 2009 templates (brain phantom).
The module follows the 3D Slicer scripted module template by Jean-Christophe Fillion-Robin
(Kitware), Andras Lasso (PerkLab) and Steve Pieper (Isomics).
""")
        iconPath = resourcePath("Icons/DiffusionMIC.png")
        if os.path.isfile(iconPath):
            self.parent.icon = qt.QIcon(iconPath)   # also found when loaded from a source checkout
        slicer.app.connect("startupCompleted()", registerSampleData)

    def resourcePath(self, filename):
        return resourcePath(filename)


#
# Sample data
#


def registerSampleData():
    """"DiffusionMIC brain phantom": simulated locally by the library (nothing is downloaded)."""
    import SampleData

    def simulate(source=None):
        with slicer.util.tryWithErrorDisplay(_("Could not simulate the DiffusionMIC brain phantom."),
                                             waitCursor=True):
            nodes = DiffusionMICLogic().loadPhantom()
            slicer.util.setSliceViewerLayers(background=nodes[0], fit=True)
        return nodes

    if hasattr(SampleData.SampleDataLogic, "registerCustomSampleDataCategory"):   # Slicer >= 5.11
        SampleData.SampleDataLogic.registerCustomSampleDataCategory("DiffusionMIC", title=_("DiffusionMIC"))
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="DiffusionMIC",
        sampleName="DiffusionMIC brain phantom",
        thumbnailFileName=resourcePath("Icons/DiffusionMICBrainPhantom.png"),
        # Not downloaded: `customDownloader` runs the phantom simulator instead. The other fields
        # only describe what gets loaded.
        uris="local:DiffusionMICLib.phantom",
        fileNames="DiffusionMICBrainPhantom.nii.gz",
        nodeNames="DiffusionMIC phantom T1",
        customDownloader=simulate,
    )


#
# Parameter node
#


@parameterPack
class DiffusionMICSampling:
    """Sampling parameters of one panel; a model's card sets them when the model is chosen."""

    sampler: Annotated[str, Choice(SAMPLERS)] = "dpm++2m"
    steps: Annotated[int, WithinRange(1, 1000)] = 10
    seed: Annotated[int, WithinRange(0, 2147483647)] = 0
    strength: Annotated[float, WithinRange(0.0, 1.0)] = 1.0
    ensemble: Annotated[int, WithinRange(1, 50)] = 1
    guidance: Annotated[float, WithinRange(0.0, 30.0)] = 1.0


@parameterNodeWrapper
class DiffusionMICParameterNode:
    """All choices of the module's panels (saved with the scene).

    <task>Model is a catalog name or model folder; <task> holds the sampling parameters; an
    empty output (None) means "create a new node".
    """

    device: Annotated[str, Choice(DEVICES)] = "auto"

    generateModel: str = ""
    generateCount: Annotated[int, WithinRange(1, 16)] = 1
    generateCondition: str = ""
    generate: DiffusionMICSampling
    generateOutput: vtkMRMLScalarVolumeNode

    translateModel: str = ""
    translateInput0: vtkMRMLScalarVolumeNode
    translateInput1: vtkMRMLScalarVolumeNode
    translateInput2: vtkMRMLScalarVolumeNode
    translate: DiffusionMICSampling
    translateOutput: vtkMRMLScalarVolumeNode

    segmentModel: str = ""
    segmentInput0: vtkMRMLScalarVolumeNode
    segmentInput1: vtkMRMLScalarVolumeNode
    segmentInput2: vtkMRMLScalarVolumeNode
    segment: DiffusionMICSampling
    segmentOutput: vtkMRMLSegmentationNode

    denoiseModel: str = ""
    denoiseInput0: vtkMRMLScalarVolumeNode
    denoise: DiffusionMICSampling
    denoiseOutput: vtkMRMLScalarVolumeNode

    anomalyModel: str = ""
    anomalyInput0: vtkMRMLScalarVolumeNode
    anomalyInput1: vtkMRMLScalarVolumeNode
    anomalyInput2: vtkMRMLScalarVolumeNode
    anomaly: DiffusionMICSampling
    anomalyOutput: vtkMRMLScalarVolumeNode

    compareInput: vtkMRMLScalarVolumeNode
    compareResult: Union[vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, None]
    compareReference: Union[vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, None]
    compareMask: vtkMRMLScalarVolumeNode
    compareTask: Annotated[str, Choice(["auto", *TASKS])] = "auto"
    compareTable: vtkMRMLTableNode


#
# DiffusionMICWidget
#


class DiffusionMICWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The GUI: thin; all work is in DiffusionMICLogic. Runs are polled by a qt.QTimer."""

    POLL_MS = 150

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._jobs = {}            # panel name -> DiffusionMICJob
        self._cards = {}           # model name -> card dict (or None)
        self._updatingModels = False
        self._inputCount = {task: 1 for task in TASKS}
        self._timer = None

    def resourcePath(self, filename):
        return resourcePath(filename)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(resourcePath("UI/DiffusionMIC.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = DiffusionMICLogic()
        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_MS)
        self._timer.connect("timeout()", self._pollJobs)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        for task in TASKS:
            self._widget(task, "ApplyButton").connect("clicked(bool)", lambda checked, t=task: self.onApply(t))
            self._widget(task, "ModelComboBox").connect(
                "currentIndexChanged(int)", lambda index, t=task: self.onModelSelected(t))
            self._widget(task, "ProgressBar").hide()
        self.ui.generateConditionComboBox.connect("currentIndexChanged(int)", self.onConditionSelected)
        self.ui.compareShowButton.connect("clicked(bool)", self.onShowSideBySide)
        self.ui.compareMetricsButton.connect("clicked(bool)", self.onComputeMetrics)
        self.ui.compareProgressBar.hide()
        self.ui.refreshModelsButton.connect("clicked(bool)", self.populateModels)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.ensureDependencies)

        self.populateModels()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        for job in list(self._jobs.values()):
            job.cancel()
        self._jobs.clear()
        if self._timer is not None:
            self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        for job in list(self._jobs.values()):   # results would land in a scene that is going away
            job.cancel()
        self._jobs.clear()
        for panel in (*TASKS, "compare"):
            self._setRunning(panel, False)
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        pn = self._parameterNode
        first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        if first is not None:
            for task in ("translate", "segment", "denoise", "anomaly"):
                if not getattr(pn, f"{task}Input0"):
                    setattr(pn, f"{task}Input0", first)

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # .ui widgets with a "SlicerParameterName" property are bound to the parameter node.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    # ---- models ----------------------------------------------------------------------------

    def _widget(self, panel, name):
        return getattr(self.ui, f"{panel}{name}")

    def populateModels(self) -> None:
        """Fill each panel's model selector from the catalog (name, description as tooltip)."""
        self._cards.clear()
        self._updatingModels = True
        try:
            for task in TASKS:
                combo = self._widget(task, "ModelComboBox")
                combo.clear()
                for entry in self.logic.models(task):
                    name = entry["name"]
                    card = self._card(name)
                    combo.addItem(name, name)
                    combo.setItemData(combo.count - 1, catalog.cardTooltip(card, entry.get("description", "")),
                                      qt.Qt.ToolTipRole)
                current = self._parameterNode and getattr(self._parameterNode, f"{task}Model")
                if current and combo.findData(current) < 0:   # a model folder chosen earlier
                    combo.addItem(os.path.basename(str(current).rstrip("/\\")) or current, current)
                    combo.setItemData(combo.count - 1, catalog.cardTooltip(self._card(current), current),
                                      qt.Qt.ToolTipRole)
                combo.addItem(_("Choose a model folder..."), "")
        finally:
            self._updatingModels = False
        self._onParameterNodeModified()

    def _card(self, model):
        if model not in self._cards:
            self._cards[model] = catalog.readCard(model) if model else None
        return self._cards[model]

    def onModelSelected(self, task) -> None:
        if self._updatingModels or not self._parameterNode:
            return
        combo = self._widget(task, "ModelComboBox")
        model = combo.currentData
        if model == "":   # "Choose a model folder..."
            folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Model folder (with model.json)"))
            if not folder or not os.path.isfile(os.path.join(folder, catalog.CARD)):
                if folder:
                    slicer.util.errorDisplay(_("'{folder}' holds no model.json.").format(folder=folder))
                self._showModel(task)
                return
            model = folder
            self._cards.pop(model, None)
            self._updatingModels = True
            combo.insertItem(combo.count - 1, os.path.basename(folder), folder)
            combo.setItemData(combo.count - 2, catalog.cardTooltip(self._card(folder), folder), qt.Qt.ToolTipRole)
            combo.currentIndex = combo.count - 2
            self._updatingModels = False
        self._selectModel(task, model or "")

    def _selectModel(self, task, model) -> None:
        """Store the model; the card's defaults become the panel's sampling parameters."""
        with slicer.util.NodeModify(self._parameterNode):
            setattr(self._parameterNode, f"{task}Model", model)
            for key, value in self.logic.cardDefaults(model).items():
                self._parameterNode.setValue(f"{task}.{key}", value)

    def onConditionSelected(self, index) -> None:
        if self._parameterNode and not self._updatingModels:
            self._parameterNode.generateCondition = self.ui.generateConditionComboBox.currentData or ""

    def _showModel(self, task) -> None:
        """Selector, tooltip, input labels and condition choices for the parameter node's model."""
        model = getattr(self._parameterNode, f"{task}Model")
        combo = self._widget(task, "ModelComboBox")
        self._updatingModels = True
        try:
            index = combo.findData(model) if model else -1
            autoSelect = index < 0 and combo.count > 1 and not model
            if autoSelect:   # the first catalog model of the task
                index = 0
                model = combo.itemData(0)
            combo.currentIndex = index
        finally:
            self._updatingModels = False
        if autoSelect:
            self._selectModel(task, model)
        card = self._card(model) if model else None
        combo.toolTip = catalog.cardTooltip(card, model or _("No model: add one to the catalog or choose a folder"))
        self._widget(task, "ModelInfoLabel").text = (card or {}).get("description", "") if card else (
            "" if model else _("No {task} model in the catalog yet.").format(task=task))
        if task == "denoise":
            return
        if task == "generate":
            conditions = self.ui.generateConditionComboBox
            classes = list((card or {}).get("classes") or [])
            wanted = [""] + classes
            if [conditions.itemData(i) for i in range(conditions.count)] != wanted:
                conditions.blockSignals(True)
                conditions.clear()
                conditions.addItem(_("(none)"), "")
                for name in classes:
                    conditions.addItem(name, name)
                conditions.blockSignals(False)
            conditions.blockSignals(True)
            conditions.currentIndex = max(conditions.findData(self._parameterNode.generateCondition or ""), 0)
            conditions.blockSignals(False)
            conditions.enabled = bool(classes)
            return
        names = list((card or {}).get("inputs") or [])
        count = max(1, min(MAX_INPUTS, len(names)))
        self._inputCount[task] = count
        for i in range(MAX_INPUTS):
            label, selector = self._widget(task, f"InputLabel{i}"), self._widget(task, f"InputSelector{i}")
            label.visible = selector.visible = i < count
            if i < count:
                label.text = (_("Input ({name}):").format(name=names[i]) if i < len(names) and count > 1
                              else _("Input volume:"))

    # ---- state ------------------------------------------------------------------------------

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        if not self._parameterNode or self._updatingModels:
            return
        for task in TASKS:
            self._showModel(task)
            if task not in self._jobs:
                ready, why = self._canApply(task)
                button = self._widget(task, "ApplyButton")
                button.enabled = ready
                button.toolTip = why
        if "compare" not in self._jobs:
            pn = self._parameterNode
            self.ui.compareShowButton.enabled = bool(pn.compareInput and pn.compareResult)
            self.ui.compareMetricsButton.enabled = bool(pn.compareResult and pn.compareReference)

    def _inputs(self, task):
        pn = self._parameterNode
        if task == "generate":
            return []
        return [getattr(pn, f"{task}Input{i}") for i in range(self._inputCount[task])]

    def _canApply(self, task):
        pn = self._parameterNode
        if not getattr(pn, f"{task}Model"):
            return False, _("Choose a model")
        if task != "generate" and not all(self._inputs(task)):
            return False, _("Choose the input volume(s)")
        return True, _("Run {title}").format(title=TASK_TITLES[task])

    def _setRunning(self, panel, running) -> None:
        button = getattr(self.ui, f"{panel}ApplyButton" if panel != "compare" else "compareMetricsButton")
        bar = self._widget(panel, "ProgressBar")
        if running:
            button.text = _("Cancel")
            button.toolTip = _("Stop the run; the scene is left as it was")
            button.enabled = True
            bar.value = 0
            bar.show()
        else:
            button.text = _("Apply") if panel != "compare" else _("Compute metrics")
            bar.hide()
            self._onParameterNodeModified()

    # ---- runs -------------------------------------------------------------------------------

    def ensureDependencies(self) -> bool:
        """PyTorch from the PyTorch extension, the rest from Resources/requirements.txt (asked first)."""
        if not self.logic.torchInstalled():
            try:
                import PyTorchUtils
            except ImportError:
                slicer.util.errorDisplay(_(
                    "DiffusionMIC needs PyTorch. Install the 'PyTorch' extension from the Extensions Manager, "
                    "restart Slicer, then press Apply again."))
                return False
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if not torchLogic.torchInstalled():
                torch = torchLogic.installTorch(askConfirmation=True, torchVersionRequirement=">=2.2")
                if torch is None:
                    slicer.util.errorDisplay(_("DiffusionMIC cannot run without PyTorch."))
                    return False
        missing = self.logic.missingRequirements()
        if not missing:
            return True
        try:
            import slicer.packaging as packaging   # Slicer >= 5.11
            pipEnsure = getattr(packaging, "pip_ensure", None)
        except ImportError:
            pipEnsure = None
        try:
            if pipEnsure is not None:
                pipEnsure(packaging.load_requirements(resourcePath("requirements.txt")), requester="DiffusionMIC")
            else:
                if not slicer.util.confirmOkCancelDisplay(
                        _("DiffusionMIC needs {count} more Python package(s). Install them into Slicer's Python now? "
                          "This can take a few minutes.").format(count=len(missing)),
                        windowTitle=_("DiffusionMIC - Install Python packages"),
                        detailedText="\n".join(missing)):
                    return False
                with slicer.util.WaitCursor():
                    slicer.util.pip_install(missing)
        except Exception as e:  # noqa: BLE001 - declined or pip failed: say so, do not crash
            slicer.util.errorDisplay(_("Python packages were not installed: {error}").format(error=e))
            return False
        import importlib
        importlib.invalidate_caches()
        still = self.logic.missingRequirements()
        if still:
            slicer.util.errorDisplay(_("Still missing: {packages}. Restart Slicer and try again.").format(
                packages=", ".join(still)))
            return False
        return True

    def onApply(self, task) -> None:
        if task in self._jobs:   # the button reads "Cancel"
            self._jobs.pop(task).cancel()
            self._widget(task, "StatusLabel").text = _("Cancelled.")
            self._setRunning(task, False)
            return
        if not self.ensureDependencies():
            return
        pn = self._parameterNode
        sampling = getattr(pn, task)
        options = {key: getattr(sampling, key) for key in catalog.FALLBACK_DEFAULTS}
        options["device"] = pn.device
        if task == "generate":
            options.update(count=pn.generateCount, condition=pn.generateCondition or None)
        with slicer.util.tryWithErrorDisplay(_("DiffusionMIC could not start."), waitCursor=True):
            job = self.logic.start(
                task, self._inputs(task), getattr(pn, f"{task}Model"), outputNode=getattr(pn, f"{task}Output"),
                onProgress=lambda j, t=task: self._onProgress(t, j),
                onFinished=lambda result, t=task: self._onFinished(t, result),
                onError=lambda error, t=task: self._onError(t, error), **options)
            self._jobs[task] = job
            self._widget(task, "StatusLabel").text = _("Starting...")
            self._setRunning(task, True)
            self._timer.start()

    def _pollJobs(self) -> None:
        for panel, job in list(self._jobs.items()):
            try:
                done = job.poll()
            except Exception:  # noqa: BLE001 - a failing callback must not stop the timer
                logging.exception("DiffusionMIC: error while finishing a run")
                done = True
            if done:
                self._jobs.pop(panel, None)
                self._setRunning(panel, False)
        if not self._jobs:
            self._timer.stop()

    def _onProgress(self, panel, job) -> None:
        self._widget(panel, "ProgressBar").value = int(round(100 * job.fraction))
        self._widget(panel, "StatusLabel").text = job.status

    def _onFinished(self, panel, result) -> None:
        label = self._widget(panel, "StatusLabel")
        wall = result.info.get("wall_time_s")
        label.text = _("Done: {node}").format(node=result.outputNode.GetName()) + (f" ({wall} s)" if wall else "")
        if panel == "anomaly":
            score = result.info.get("score")
            self.ui.anomalyScoreLabel.text = "-" if score is None else f"{score:.4g}"
        if panel in ("translate", "segment", "denoise", "anomaly") and result.inputNodes:
            # Ready for the Compare panel.
            self._parameterNode.compareInput = result.inputNodes[0]
            self._parameterNode.compareResult = result.outputNode
            self._parameterNode.compareTask = panel
        if panel == "compare":
            self._parameterNode.compareTable = result.outputNode   # the next comparison adds a row
            self.ui.compareTableView.setMRMLTableNode(result.outputNode)
            self.ui.compareStatusLabel.text = _("Metrics in table '{name}'.").format(name=result.outputNode.GetName())

    def _onError(self, panel, error) -> None:
        self._widget(panel, "StatusLabel").text = _("Failed.")
        slicer.util.errorDisplay(_("DiffusionMIC {task} failed:\n{error}").format(task=panel, error=error))

    # ---- compare ----------------------------------------------------------------------------

    def onShowSideBySide(self) -> None:
        pn = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Cannot show side by side."), waitCursor=True):
            self.logic.showSideBySide(pn.compareInput, pn.compareResult)

    def onComputeMetrics(self) -> None:
        if "compare" in self._jobs:
            self._jobs.pop("compare").cancel()
            self.ui.compareStatusLabel.text = _("Cancelled.")
            self._setRunning("compare", False)
            return
        if not self.ensureDependencies():
            return
        pn = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Cannot compute metrics."), waitCursor=True):
            job = self.logic.startCompare(
                pn.compareResult, pn.compareReference, task=None if pn.compareTask == "auto" else pn.compareTask,
                maskNode=pn.compareMask, tableNode=pn.compareTable, inputNode=pn.compareInput,
                onFinished=lambda result: self._onFinished("compare", result),
                onError=lambda error: self._onError("compare", error))
            self._jobs["compare"] = job
            self.ui.compareStatusLabel.text = _("Computing metrics...")
            self._setRunning("compare", True)
            self._timer.start()


#
# DiffusionMICLogic
#


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
                if _hasApp():
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
        if self.state != "running":
            return
        self.process.cancel()
        self.state = "cancelled"
        self._removeTempDir()

    def _removeTempDir(self) -> None:
        if self.tempDir:
            shutil.rmtree(self.tempDir, ignore_errors=True)


class DiffusionMICLogic(ScriptedLoadableModuleLogic):
    """Runs DiffusionMICLib on MRML nodes; usable from the Python console and outside Slicer.

    Blocking, one method per task (nodes in, nodes out)::

        logic = DiffusionMICLogic()
        denoised = logic.denoise(volumeNode, model="brain-mri-denoise", steps=10)
        segmentation = logic.segment(t1Node, model="brain-mri-segment", ensemble=5)
        anomalyMap = logic.anomaly(t1Node, model="brain-mri-anomaly")   # score: logic.lastResult.info["score"]
        synthetic = logic.translate([t1Node, t2Node], model="brain-mri-t1t2-to-flair")
        generated = logic.generate(model="brain-mri-generate", count=2)  # a list of volume nodes
        table = logic.compare(denoised, cleanNode)

    Non-blocking: ``job = logic.start("denoise", [volumeNode], model, onProgress=..., onFinished=...)``,
    then ``job.poll()`` from a timer (``job.cancel()`` to stop).
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.pythonExecutable = None     # None: PythonSlicer inside Slicer, else this Python
        self.backendModule = "DiffusionMICLib"   # run as `python -m <backendModule> ...`
        self.lastResult = None

    def getParameterNode(self):
        node = ScriptedLoadableModuleLogic.getParameterNode(self)
        if HAVE_QT:
            return DiffusionMICParameterNode(node)
        return node   # slicer-core: the wrapper needs Qt; the raw vtkMRMLScriptedModuleNode

    # ---- environment ----------------------------------------------------------------------

    def python(self) -> str:
        if self.pythonExecutable:
            return self.pythonExecutable
        if _hasApp():
            found = shutil.which("PythonSlicer")
            if not found:
                raise RuntimeError("PythonSlicer was not found; it comes with Slicer and runs DiffusionMICLib")
            return found
        return sys.executable

    def backendCommand(self, *args) -> list:
        return [self.python(), "-m", self.backendModule, *[str(a) for a in args]]

    def backendEnvironment(self) -> dict:
        root = catalog.libraryRoot()
        if root is None:
            raise RuntimeError("DiffusionMICLib was not found: it should be next to the DiffusionMIC module "
                               "(extension) or at the top of the source checkout")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(root)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONIOENCODING"] = "utf-8"
        return env

    @staticmethod
    def torchInstalled() -> bool:
        return catalog.isSatisfied("torch")

    @staticmethod
    def requirements() -> list:
        return catalog.readRequirements(resourcePath("requirements.txt"))

    def missingRequirements(self) -> list:
        """Requirements of Resources/requirements.txt (and torch) not installed in this Python."""
        return catalog.missingRequirements(["torch>=2.2"] + self.requirements())

    # ---- models -----------------------------------------------------------------------------

    @staticmethod
    def models(task) -> list:
        """Catalog entries for a task: [{"name", "task", "description"}] (`diffusion-mic models list`)."""
        return catalog.modelsForTask(task)

    @staticmethod
    def modelCard(model):
        """The model card (dict) of a catalog name or model folder; None if not on this computer."""
        return catalog.readCard(model) if model else None

    def cardDefaults(self, model) -> dict:
        """sampler, steps, seed, strength, ensemble, guidance a run of `model` uses by default."""
        return catalog.cardDefaults(self.modelCard(model))

    # ---- runs -------------------------------------------------------------------------------

    def _tempDir(self) -> str:
        base = slicer.app.temporaryPath if _hasApp() else None
        return tempfile.mkdtemp(prefix="DiffusionMIC-", dir=base)

    def _startJob(self, task, args, finish, onProgress=None, onFinished=None, onError=None, tempDir=None,
                  writeInputs=None):
        tempDir = tempDir or self._tempDir()
        try:
            if writeInputs is not None:
                writeInputs(tempDir)
            command = self.backendCommand(*args(tempDir))
            env = self.backendEnvironment()
            logging.info("DiffusionMIC: " + " ".join(command))
            return DiffusionMICJob(task, command, env, tempDir, finish, onProgress, onFinished, onError)
        except BaseException:
            shutil.rmtree(tempDir, ignore_errors=True)
            raise

    def start(self, task, inputNodes, model, outputNode=None, *, sampler=None, steps=None, seed=None,
              strength=None, ensemble=None, guidance=None, count=None, condition=None, device=None, show=True,
              onProgress=None, onFinished=None, onError=None) -> DiffusionMICJob:
        """Start `diffusion-mic run TASK` on the input nodes in the background; returns the job.

        None options take the model card's defaults. The inputs are written to a temporary
        folder (removed afterwards); the results are brought into the scene when the job is
        polled after the backend has finished.
        """
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
        if not model:
            raise ValueError(f"choose a {task} model (a catalog name or a model folder)")
        if inputNodes is None:
            inputNodes = []
        elif not isinstance(inputNodes, (list, tuple)):
            inputNodes = [inputNodes]
        inputNodes = list(inputNodes)
        if task == "generate":
            if inputNodes:
                raise ValueError("generate takes no input volume")
        else:
            if not inputNodes or any(n is None for n in inputNodes):
                raise ValueError(f"{task} needs input volume(s)")
            for node in inputNodes:
                if not node.IsA("vtkMRMLScalarVolumeNode"):
                    raise ValueError(f"'{node.GetName()}' is not a scalar volume")
            if len({n.GetTransformNodeID() for n in inputNodes}) > 1:
                raise ValueError("the input volumes are under different transforms: harden the transforms first")
        if sampler is not None and sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}")
        if outputNode is not None:
            wanted = "vtkMRMLSegmentationNode" if task == "segment" else "vtkMRMLScalarVolumeNode"
            if not outputNode.IsA(wanted):
                raise ValueError(f"the {task} output must be a {wanted}, not {outputNode.GetClassName()}")
            if outputNode in inputNodes:
                raise ValueError("the output node is one of the inputs: choose another output")
        card = self.modelCard(model)
        options = {"sampler": sampler, "steps": steps, "seed": seed, "strength": strength, "ensemble": ensemble,
                   "guidance": guidance, "device": device}
        if task == "generate":
            options.update(count=count, condition=condition)

        def writeInputs(folder):
            for i, node in enumerate(inputNodes):
                mrml.writeVolume(node, os.path.join(folder, f"input{i}.nrrd"))

        def args(folder):
            out = ["run", task, "--model", model]
            for i in range(len(inputNodes)):
                out += ["--input", os.path.join(folder, f"input{i}.nrrd")]
            out += ["--output", os.path.join(folder, "output.nrrd"), "--progress", "json"]
            if task == "segment":
                out += ["--uncertainty", os.path.join(folder, "uncertainty.nrrd")]
            if task == "anomaly":
                out += ["--mask", os.path.join(folder, "mask.nrrd")]
            for key, value in options.items():
                if value is not None and value != "":
                    out += [f"--{key}", value]
            return out

        def finish(info):
            result = self._importResults(task, model, card, inputNodes, outputNode, info, show)
            self.lastResult = result
            return result

        return self._startJob(task, args, finish, onProgress, onFinished, onError, writeInputs=writeInputs)

    def run(self, task, inputNodes, model, outputNode=None, **options) -> DiffusionMICResult:
        """Blocking `start`: returns the DiffusionMICResult, or raises the backend's error."""
        return self.start(task, inputNodes, model, outputNode, **options).wait()

    def generate(self, model, outputNode=None, count=1, condition=None, **options) -> list:
        """New volume(s) sampled from `model` (its card gives the grid); returns a list of nodes."""
        result = self.run("generate", [], model, outputNode, count=count, condition=condition, **options)
        return [node for key, node in result.nodes.items()]

    def translate(self, inputNodes, model, outputNode=None, **options):
        """The modality the model makes (e.g. FLAIR from T1 and T2), on the first input's grid."""
        return self.run("translate", inputNodes, model, outputNode, **options).outputNode

    def segment(self, inputNodes, model, outputNode=None, **options):
        """A Segmentation node with the card's named segments; the uncertainty volume is
        result.nodes["uncertainty"] and the node reference "DiffusionMIC.uncertainty"."""
        return self.run("segment", inputNodes, model, outputNode, **options).outputNode

    def denoise(self, inputNode, model, outputNode=None, **options):
        """The denoised volume, in the input's units and on its grid."""
        return self.run("denoise", [inputNode], model, outputNode, **options).outputNode

    def anomaly(self, inputNodes, model, outputNode=None, **options):
        """The anomaly map volume (shown over the input); its thresholded Segmentation is the node
        reference "DiffusionMIC.mask", the score the attribute "DiffusionMIC.score"."""
        return self.run("anomaly", inputNodes, model, outputNode, **options).outputNode

    # ---- results into the scene ---------------------------------------------------------------

    @staticmethod
    def generatedKeys(keys, card, info) -> list:
        """Generate's output keys in order, with (sample number, channel name) each.

        The library names them output, T2, 2, 2-T2, ...: sample 1 channel 1 is "output",
        later channels add their name, later samples their number (1-based).
        """
        channels = list(info.get("channels") or (card or {}).get("outputs") or ["image"])
        out = []
        for key in keys:
            sample, channel = 1, channels[0]
            if key != "output":
                first, _sep, rest = key.partition("-")
                if first.isdigit():
                    sample, channel = int(first), rest or channels[0]
                else:
                    channel = key
            if channel == "image" and info.get("condition"):   # modality-conditional: the class is the contrast
                channel = str(info["condition"])
            order = channels.index(channel) if channel in channels else len(channels)
            out.append((sample, order, key, channel))
        return [(key, sample, channel) for sample, order, key, channel in sorted(out)]

    @staticmethod
    def outputName(task, inputNodes, card, model, key="output") -> str:
        """New nodes are named after their input and task: T1_denoised, T1_to_FLAIR, ..."""
        base = inputNodes[0].GetName() if inputNodes else ""
        if task == "generate":
            name = (card or {}).get("name") or os.path.basename(str(model).rstrip("/\\")) or "model"
            return f"{name}_generated" + (f"_{key}" if key != "output" else "")
        if task == "denoise":
            return f"{base}_denoised"
        if task == "translate":
            made = ((card or {}).get("outputs") or ["translated"])[0]
            return f"{base}_to_{made}"
        if task == "segment":
            return f"{base}_segmentation" if key == "output" else f"{base}_segmentation_{key}"
        if task == "anomaly":
            return f"{base}_anomaly_map" if key == "output" else f"{base}_anomaly_{key}"
        return f"{base}_{task}_{key}"

    def _importResults(self, task, model, card, inputNodes, outputNode, info, show) -> DiffusionMICResult:
        outputs = info.get("outputs") or {}
        if "output" not in outputs:
            raise BackendError(f"the backend wrote no output ({', '.join(outputs) or 'nothing'})")
        reference = inputNodes[0] if inputNodes else None
        # 1. Read every file into nodes outside the scene: a bad file changes nothing.
        sources = {}
        for key, path in outputs.items():
            sources[key] = mrml.readVolume(path)
            if reference is not None:
                mrml.checkSameGrid(sources[key], reference, f"the {task} output '{key}'")
        # 2. Put them into the scene; on any failure remove what was made.
        staging = mrml.Staging()
        nodes = {}
        try:
            if task in ("denoise", "translate"):
                nodes["output"] = mrml.commitVolume(staging, sources["output"], self.outputName(task, inputNodes, card, model),
                                                    outputNode, like=reference)
            elif task == "segment":
                labels = dict(info.get("labels") or (card or {}).get("labels") or {})
                nodes["output"] = mrml.commitSegmentation(staging, sources["output"],
                                                          self.outputName(task, inputNodes, card, model), reference,
                                                          labels, outputNode)
                if "uncertainty" in sources:
                    nodes["uncertainty"] = mrml.commitVolume(
                        staging, sources["uncertainty"], self.outputName(task, inputNodes, card, model, "uncertainty"),
                        like=reference)
                    mrml.setHeatDisplay(nodes["uncertainty"])
                    nodes["output"].SetNodeReferenceID(ATTRIBUTE + "uncertainty", nodes["uncertainty"].GetID())
            elif task == "anomaly":
                nodes["output"] = mrml.commitVolume(staging, sources["output"], self.outputName(task, inputNodes, card, model),
                                                    outputNode, like=reference)
                lower = info.get("threshold")   # the level the mask was made at
                if "mask" in sources:
                    mapArray = slicer.util.arrayFromVolume(nodes["output"])
                    maskArray = slicer.util.arrayFromVolume(sources["mask"]) > 0
                    if lower is None and maskArray.any():
                        lower = float(mapArray[maskArray].min())
                    nodes["mask"] = mrml.commitSegmentation(
                        staging, mrml.volumeFromArray(maskArray.astype(np.uint8), reference),
                        self.outputName(task, inputNodes, card, model, "mask"), reference,
                        {"anomaly": 1}, emptySegments=["anomaly"])
                    nodes["output"].SetNodeReferenceID(ATTRIBUTE + "mask", nodes["mask"].GetID())
                mrml.setHeatDisplay(nodes["output"], lower)
                score = info.get("score", info.get("anomaly_score"))
                if score is not None:
                    info["score"] = score
                    nodes["output"].SetAttribute(ATTRIBUTE + "score", repr(score))
            else:   # generate: every output is a generated volume, on the model's own grid
                ordered = self.generatedKeys(list(sources), card, info)
                several = len({sample for _key, sample, _channel in ordered}) > 1
                manyChannels = len({channel for _key, _sample, channel in ordered}) > 1
                for i, (key, sample, channel) in enumerate(ordered):
                    suffix = "_".join(([channel] if manyChannels or channel not in ("image",) else [])
                                      + ([str(sample)] if several else []))
                    name = self.outputName(task, inputNodes, card, model) + (f"_{suffix}" if suffix else "")
                    nodes[key] = mrml.commitVolume(staging, sources[key], name, outputNode if i == 0 else None)
            for node in nodes.values():
                node.SetAttribute(ATTRIBUTE + "task", task)
                node.SetAttribute(ATTRIBUTE + "model", str(model))
                node.SetAttribute(ATTRIBUTE + "run", json.dumps({k: v for k, v in info.items() if k != "outputs"}))
                if reference is not None:
                    node.SetNodeReferenceID(ATTRIBUTE + "input", reference.GetID())
                mrml.placeBeside(node, reference)
        except BaseException:
            staging.rollback()
            raise
        result = DiffusionMICResult(task, nodes["output"], nodes, info, inputNodes)
        if show:
            self.showResult(result)
        return result

    def showResult(self, result) -> None:
        """Show a result in the slice views (works on any scene that has slice views)."""
        fit = _hasApp()
        main = result.outputNode
        inputs = result.inputNodes
        if result.task == "anomaly" and inputs:
            slicer.util.setSliceViewerLayers(background=inputs[0], foreground=main, foregroundOpacity=0.5, fit=fit)
        elif result.task == "segment" and inputs:
            slicer.util.setSliceViewerLayers(background=inputs[0], fit=fit)
        elif main.IsA("vtkMRMLScalarVolumeNode"):
            slicer.util.setSliceViewerLayers(background=main, fit=fit)

    # ---- compare ---------------------------------------------------------------------------------

    def showSideBySide(self, inputNode, resultNode) -> None:
        """Input (left, Red) and result (right, Yellow) side by side, linked views."""
        if inputNode is None or resultNode is None:
            raise ValueError("choose an input and a result to compare")
        mrml.showSideBySide(inputNode, resultNode)
        if _hasApp() and slicer.app.layoutManager() is not None:
            for name in ("Red", "Yellow"):
                widget = slicer.app.layoutManager().sliceWidget(name)
                if widget is not None:
                    widget.sliceLogic().FitSliceToAll()

    def startCompare(self, resultNode, referenceNode, task=None, maskNode=None, tableNode=None, inputNode=None,
                     onFinished=None, onError=None) -> DiffusionMICJob:
        """Start `diffusion-mic evaluate TASK --pred --ref [--mask]`; a row of metrics goes into
        `tableNode` (or a new table node)."""
        if resultNode is None or referenceNode is None:
            raise ValueError("choose a result and a reference")
        task = task or resultNode.GetAttribute(ATTRIBUTE + "task") or (
            "segment" if resultNode.IsA("vtkMRMLSegmentationNode") else None)
        if task not in TASKS:
            raise ValueError("choose the task whose metrics to compute (the result was not made by DiffusionMIC)")
        grid = self._compareGrid(resultNode, referenceNode, inputNode)
        valueOf = None
        if resultNode.IsA("vtkMRMLSegmentationNode"):
            seg = resultNode.GetSegmentation()
            valueOf = {seg.GetNthSegment(i).GetName(): mrml.segmentLabelValue(seg.GetNthSegment(i), i)
                       for i in range(seg.GetNumberOfSegments())}

        def toFile(node, path, values=None):
            if node.IsA("vtkMRMLSegmentationNode"):
                node = mrml.volumeFromArray(mrml.labelArrayFromSegmentation(node, grid, values), grid)
            mrml.writeVolume(node, path)

        def writeInputs(folder):
            toFile(resultNode, os.path.join(folder, "pred.nrrd"))
            toFile(referenceNode, os.path.join(folder, "ref.nrrd"), valueOf)
            if maskNode is not None:
                toFile(maskNode, os.path.join(folder, "mask.nrrd"))

        def args(folder):
            out = ["evaluate", task, "--pred", os.path.join(folder, "pred.nrrd"), "--ref", os.path.join(folder, "ref.nrrd")]
            if maskNode is not None:
                out += ["--mask", os.path.join(folder, "mask.nrrd")]
            return out

        def finish(metrics):
            if not isinstance(metrics, dict):
                raise BackendError(f"unexpected metrics from the backend: {metrics!r}")
            staging = mrml.Staging()
            try:
                table = tableNode or staging.add("vtkMRMLTableNode",
                                                 f"{resultNode.GetName()}_vs_{referenceNode.GetName()}_metrics")
                flat = mrml.flattenMetrics(metrics)
                if valueOf:   # per-label metrics are keyed by label value: name them after the segments
                    names = {str(v): n for n, v in valueOf.items()}
                    flat = {mrml.nameLabelColumn(k, names): v for k, v in flat.items()}
                mrml.addMetricsRow(table, {"Result": resultNode.GetName(), "Reference": referenceNode.GetName(),
                                           "Mask": maskNode.GetName() if maskNode else "", "Task": task}, flat)
                table.SetAttribute(ATTRIBUTE + "task", task)
                mrml.placeBeside(table, resultNode)
            except BaseException:
                staging.rollback()
                raise
            result = DiffusionMICResult("compare", table, {"output": table}, metrics, [resultNode, referenceNode])
            self.lastResult = result
            return result

        return self._startJob("compare", args, finish, None, onFinished, onError, writeInputs=writeInputs)

    def compare(self, resultNode, referenceNode, task=None, maskNode=None, tableNode=None, inputNode=None):
        """Metrics of a result against a reference into a table node (blocking); returns the table."""
        return self.startCompare(resultNode, referenceNode, task, maskNode, tableNode, inputNode).wait().outputNode

    @staticmethod
    def _compareGrid(resultNode, referenceNode, inputNode):
        """The voxel grid segmentations are exported on: a volume among reference, result, input."""
        inputRef = resultNode.GetNodeReference(ATTRIBUTE + "input")
        for node in (referenceNode, resultNode, inputNode, inputRef):
            if node is not None and node.IsA("vtkMRMLScalarVolumeNode"):
                return node
        raise ValueError("comparing two segmentations needs a volume for their voxel grid: choose the input volume")

    # ---- sample data and training (used by the self-test) -----------------------------------

    def startPhantom(self, seed=0, noise=3.0, lesions=3, resolution=2.0, onProgress=None, onFinished=None,
                     onError=None) -> DiffusionMICJob:
        """Simulate one phantom subject (DiffusionMICLib.phantom) and load it into the scene."""

        def args(folder):
            return ["phantom", os.path.join(folder, "phantom"), "--subjects", 1, "--seed", seed, "--noise", noise,
                    "--lesions", lesions, "--resolution", resolution, "--progress", "json"]

        def finish(info):
            folder = info["out"]
            case = info["cases"][0]
            dataset = json.loads(open(os.path.join(folder, "dataset.json"), encoding="utf-8").read())
            channels = dataset["channel_names"]
            files = [(f"DiffusionMIC phantom {name}", os.path.join(folder, "imagesTr", f"{case}_{int(i):04d}.nii.gz"),
                      "vtkMRMLScalarVolumeNode") for i, name in sorted(channels.items(), key=lambda kv: int(kv[0]))]
            files.append((f"DiffusionMIC phantom {channels['0']} clean",
                          os.path.join(folder, "cleanTr", f"{case}_0000.nii.gz"), "vtkMRMLScalarVolumeNode"))
            files.append(("DiffusionMIC phantom labels", os.path.join(folder, "labelsTr", f"{case}.nii.gz"),
                          "vtkMRMLLabelMapVolumeNode"))
            sources = [(name, mrml.readVolume(path, className), className) for name, path, className in files]
            staging = mrml.Staging()
            try:
                sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
                folderItem = sh.CreateFolderItem(sh.GetSceneItemID(), slicer.mrmlScene.GenerateUniqueName(
                    "DiffusionMIC brain phantom"))
                nodes = []
                for name, source, className in sources:
                    node = mrml.commitVolume(staging, source, name, className=className)
                    node.SetAttribute(ATTRIBUTE + "phantom", json.dumps({"seed": seed, "case": case}))
                    sh.SetItemParent(sh.GetItemByDataNode(node) or sh.CreateItem(folderItem, node), folderItem)
                    nodes.append(node)
                labelNode = nodes[-1]
                labelNode.SetAttribute(ATTRIBUTE + "labels", ",".join(f"{n}={v}" for n, v in dataset["labels"].items()))
            except BaseException:
                staging.rollback()
                raise
            return DiffusionMICResult("phantom", nodes[0], {n.GetName(): n for n in nodes}, info)

        return self._startJob("phantom", args, finish, onProgress, onFinished, onError)

    def loadPhantom(self, seed=0, noise=3.0, lesions=3, resolution=2.0) -> list:
        """The "DiffusionMIC brain phantom" sample: T1, T2, PD, FLAIR, clean T1 and the label map."""
        return list(self.startPhantom(seed, noise, lesions, resolution).wait().nodes.values())

    def startTrain(self, task, dataDir, outDir, maxSteps=None, config=None, onProgress=None, onFinished=None,
                   onError=None) -> DiffusionMICJob:
        """`diffusion-mic train TASK --data DIR --out DIR` in the background; result.info["model"] is the folder."""

        def args(folder):
            out = ["train", task, "--data", dataDir, "--out", outDir, "--progress", "json"]
            if maxSteps:
                out += ["--max-steps", maxSteps]
            if config:
                path = config
                if isinstance(config, dict):
                    path = os.path.join(folder, "config.json")
                    with open(path, "w", encoding="utf-8") as f:
                        json.dump(config, f)
                out += ["--config", path]
            return out

        def finish(info):
            return DiffusionMICResult("train", None, {}, info)

        return self._startJob("train", args, finish, onProgress, onFinished, onError)


#
# DiffusionMICTest
#


class DiffusionMICTest(ScriptedLoadableModuleTest):
    """Every panel's Logic end to end inside Slicer, on the locally simulated brain phantom.

    A task uses its catalog model when one is on this computer, else a tiny model trained here
    for a few steps (seconds to minutes on a CPU); a task the library does not provide yet is
    reported and skipped.
    """

    TINY = {"network": {"channels": [16, 32], "attention_levels": [False, False], "norm_num_groups": 16},
            "patch": [48, 48], "train": {"batch_size": 4}}
    # Per task: small, quick settings (a small grid for generate; a fixed anomaly threshold skips
    # the threshold calibration after training).
    TASK_SETTINGS = {
        "translate": {"task": {"inputs": ["T1", "T2"], "output": "FLAIR"}},
        "segment": {"task": {"inputs": ["T1", "FLAIR"]}},
        "anomaly": {"task": {"channels": ["FLAIR"], "threshold": 1.0}},
        "generate": {"grid": {"size": [16, 16, 8], "spacing": [4.0, 4.0, 4.0], "origin": [30.0, 30.0, -10.0],
                              "direction": [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0]}},
    }

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_DiffusionMIC_all_panels()

    def _node_count(self):
        return slicer.mrmlScene.GetNumberOfNodes()

    def _model(self, logic, task, workDir, phantomDir):
        for entry in logic.models(task):
            if logic.modelCard(entry["name"]) is not None:
                return entry["name"]
        out = os.path.join(workDir, f"model-{task}")
        job = logic.startTrain(task, phantomDir, out, maxSteps=5, config={**self.TINY, **self.TASK_SETTINGS.get(task, {})})
        try:
            job.wait()
        except BackendError as e:
            self.delayDisplay(f"{task}: skipped ({e})")
            return None
        return out

    def _assertSameGeometry(self, node, reference):
        self.assertEqual(node.GetImageData().GetDimensions(), reference.GetImageData().GetDimensions())
        np.testing.assert_allclose(mrml.ijkToRAS(node), mrml.ijkToRAS(reference), atol=1e-6)

    def test_DiffusionMIC_all_panels(self):
        self.delayDisplay("Simulating the DiffusionMIC brain phantom")
        logic = DiffusionMICLogic()
        nodes = {n.GetName(): n for n in logic.loadPhantom(seed=0)}
        t1 = nodes["DiffusionMIC phantom T1"]
        self.assertIsNotNone(t1.GetImageData())
        self.assertTrue(nodes["DiffusionMIC phantom labels"].IsA("vtkMRMLLabelMapVolumeNode"))
        workDir = tempfile.mkdtemp(prefix="DiffusionMICTest-")
        phantomJob = logic._startJob("phantom-data", lambda folder: ["phantom", os.path.join(workDir, "data"),
                                                                     "--subjects", 1, "--progress", "json"],
                                     lambda info: DiffusionMICResult("phantom-data", None, {}, info))
        phantomJob.wait()
        phantomDir = os.path.join(workDir, "data")
        byModality = {name.split()[-1]: node for name, node in nodes.items() if name.count(" ") == 2}
        try:
            # Denoise: a new volume on the input's grid, placed beside it.
            model = self._model(logic, "denoise", workDir, phantomDir)
            self.assertIsNotNone(model, "denoise must be available")
            before = self._node_count()
            denoised = logic.denoise(t1, model=model, steps=2)
            self.assertGreater(self._node_count(), before)
            self._assertSameGeometry(denoised, t1)
            self.assertEqual(denoised.GetName(), "DiffusionMIC phantom T1_denoised")
            self.delayDisplay("Denoise done")

            # Compare: side by side, and metrics against the clean image into a table.
            logic.showSideBySide(t1, denoised)
            table = logic.compare(denoised, nodes["DiffusionMIC phantom T1 clean"])
            self.assertEqual(table.GetNumberOfRows(), 1)
            self.assertGreaterEqual(table.GetColumnIndex("psnr"), 0)
            self.delayDisplay("Compare done")

            # Cancel: scene unchanged.
            before = self._node_count()
            job = logic.start("denoise", [t1], model, steps=500)
            time.sleep(2)
            job.cancel()
            self.assertEqual(job.state, "cancelled")
            self.assertEqual(self._node_count(), before)

            # A failing run: no node, the backend's message.
            before = self._node_count()
            with self.assertRaises(BackendError) as raised:
                logic.denoise(t1, model=os.path.join(workDir, "no-such-model"))
            self.assertIn("no-such-model", str(raised.exception))
            self.assertEqual(self._node_count(), before)

            # The other panels, where the library provides the task.
            model = self._model(logic, "segment", workDir, phantomDir)
            if model:
                card = logic.modelCard(model) or {}
                inputs = [byModality.get(name, t1) for name in (card.get("inputs") or ["T1"])]
                segmentation = logic.segment(inputs, model=model, steps=2, ensemble=2)
                self.assertTrue(segmentation.IsA("vtkMRMLSegmentationNode"))
                names = mrml.segmentNames(segmentation)
                self.assertTrue(set(names) <= set(card.get("labels", {})) | {f"label {v}" for v in range(256)})
                uncertainty = logic.lastResult.nodes.get("uncertainty")
                if uncertainty is not None:
                    self._assertSameGeometry(uncertainty, inputs[0])
                self.delayDisplay("Segment done")

            model = self._model(logic, "translate", workDir, phantomDir)
            if model:
                card = logic.modelCard(model) or {}
                inputs = [byModality.get(name, t1) for name in (card.get("inputs") or ["T1"])]
                synthetic = logic.translate(inputs, model=model, steps=2)
                self._assertSameGeometry(synthetic, inputs[0])
                self.delayDisplay("Modality conversion done")

            model = self._model(logic, "anomaly", workDir, phantomDir)
            if model:
                card = logic.modelCard(model) or {}
                inputs = [byModality.get(name, t1) for name in (card.get("inputs") or ["T1"])]
                anomalyMap = logic.anomaly(inputs, model=model, steps=2)
                self._assertSameGeometry(anomalyMap, inputs[0])
                self.assertIsNotNone(anomalyMap.GetNodeReference("DiffusionMIC.mask"))
                self.delayDisplay("Anomaly detection done")

            model = self._model(logic, "generate", workDir, phantomDir)
            if model:
                generated = logic.generate(model=model, count=1, steps=2)
                self.assertEqual(len(generated), 1)
                self.assertIsNotNone(generated[0].GetImageData())
                self.delayDisplay("Generate done")
        finally:
            shutil.rmtree(workDir, ignore_errors=True)
        self.delayDisplay("Test passed")
