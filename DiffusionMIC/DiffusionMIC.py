"""DiffusionMIC: diffusion models for medical image computing in 3D Slicer.

One panel per task (generate, modality conversion, segment, denoise, anomaly detection), a
Compare panel, Fine-tune and Text to image. This file holds the module class, the Widget's
wiring and the test entry point; the work is in DiffusionMICModule/ (logic, jobs, results, panels,
install, selftest, ...).
DiffusionMICLogic needs no Qt: it also runs on slicer-core, outside Slicer.
"""
import logging
import os
import sys

import vtk

import slicer

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

from DiffusionMICModule import catalog, install, panels, sampledata, selftest  # noqa: E402
from DiffusionMICModule.compat import (  # noqa: E402,F401
    HAVE_QT,
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
    VTKObservationMixin,
    qt,
    translate,
)
from DiffusionMICModule.compat import tr as _  # noqa: E402
from DiffusionMICModule.jobs import DiffusionMICCancelled, DiffusionMICJob, DiffusionMICResult  # noqa: E402,F401
from DiffusionMICModule.logic import DependencyError, DiffusionMICLogic  # noqa: E402,F401
from DiffusionMICModule.panels import PANELS, TASKS  # noqa: E402,F401
from DiffusionMICModule.panelview import PanelView  # noqa: E402
from DiffusionMICModule.parameters import DiffusionMICParameterNode, DiffusionMICSampling  # noqa: E402,F401
from DiffusionMICModule.text2image import Text2ImageLogic  # noqa: E402
from DiffusionMICModule.text2imageview import Text2ImagePanels  # noqa: E402

resourcePath = catalog.resourcePath


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
thresholded region and a score). Each panel: pick a model, then one input volume per contrast it
asks for, press Apply. Results appear next to the input in the Data module, on the input's exact
voxel grid. <b>Compare</b> shows an input and a result side by side with linked views and
measures a result against a reference (PSNR, SSIM, Dice, ...) into a table. <b>Fine-tune</b>
adapts a model to your own images; <b>Text to image</b> makes images from a prompt.
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
        slicer.app.connect("startupCompleted()", sampledata.register)

    def resourcePath(self, filename):
        return resourcePath(filename)


class DiffusionMICWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Thin GUI: panels.py says what each panel shows, DiffusionMICLogic does the work; runs are
    polled by a qt.QTimer."""

    POLL_MS = 150

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._jobs = {}            # panel name -> DiffusionMICJob
        self._cards = {}           # model -> card dict (or None)
        self._views = {}           # task -> PanelView
        self._text2image = None    # the Fine-tune and Text-to-image panels
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
        for p in PANELS:
            self._views[p.task] = view = PanelView(p, self.ui, self._card)
            view.onInputChanged = lambda index, node, t=p.task: self.onInputChanged(t, index, node)
            self._widget(p.task, "ApplyButton").connect("clicked(bool)", lambda checked, t=p.task: self.onApply(t))
            self._widget(p.task, "ModelComboBox").connect(
                "currentIndexChanged(int)", lambda index, t=p.task: self.onModelSelected(t))
            self._widget(p.task, "ProgressBar").hide()
        self.ui.generateConditionComboBox.connect("currentIndexChanged(int)", self.onConditionSelected)
        self.ui.compareShowButton.connect("clicked(bool)", self.onShowSideBySide)
        self.ui.compareMetricsButton.connect("clicked(bool)", self.onComputeMetrics)
        self.ui.compareProgressBar.hide()
        self.ui.refreshModelsButton.connect("clicked(bool)", self.populateModels)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onCheckDependencies)
        self._text2image = Text2ImagePanels(self.ui, self.logic, Text2ImageLogic(), onModelsChanged=self.populateModels)
        self.populateModels()
        self.initializeParameterNode()

    def onReload(self) -> None:
        """Developer mode: DiffusionMICModule/ is imported afresh too (Slicer reloads only this file)."""
        for name in [n for n in sys.modules if n == "DiffusionMICModule" or n.startswith("DiffusionMICModule.")]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    def cleanup(self) -> None:
        self._cancelAll()
        self._text2image.cancelAll()
        self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def _cancelAll(self) -> None:
        """Cancel every run; returns at once (the processes are reaped in the background)."""
        for job in list(self._jobs.values()):
            job.cancel()
        self._jobs.clear()

    def onSceneStartClose(self, caller, event) -> None:
        self._cancelAll()   # results would land in a scene that is going away
        self._text2image.cancelAll()
        for panel in (*TASKS, "compare"):
            self._setRunning(panel, False)
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        self._text2image.pn = inputParameterNode
        if self._parameterNode:
            # .ui widgets with a "SlicerParameterName" property are bound to the parameter node;
            # the input selectors are built here from the model's card and bound by _onInputChanged.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _widget(self, panel, name):
        return getattr(self.ui, f"{panel}{name}")

    def _card(self, model):
        if model not in self._cards:
            self._cards[model] = catalog.readCard(model) if model else None
        return self._cards[model]

    def populateModels(self) -> None:
        """Fill each panel's model selector from the catalog."""
        self._cards.clear()
        for task, view in self._views.items():
            view.populate(panels.modelEntries(view.panel, self.logic.models),
                          self._parameterNode and getattr(self._parameterNode, f"{task}Model"))
        self._text2image.populate()
        self._onParameterNodeModified()

    def onModelSelected(self, task) -> None:
        if not self._parameterNode:
            return
        model = self._views[task].chosenModel()
        if model is None:   # no folder chosen: show the model as it was
            self._onParameterNodeModified()
            return
        self._cards.pop(model, None)
        self._views[task].selectModel(self._parameterNode, model)

    def onConditionSelected(self, index) -> None:
        if self._parameterNode:
            self._parameterNode.generateCondition = self.ui.generateConditionComboBox.currentData or ""

    def onInputChanged(self, task, index, node) -> None:
        if self._parameterNode:
            self._views[task].setInput(self._parameterNode, index, node)

    def onCheckDependencies(self) -> None:
        if install.ensureDependencies():
            slicer.util.infoDisplay(_("All Python packages DiffusionMIC needs are installed."))

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        if not self._parameterNode:
            return
        pn = self._parameterNode
        if not self._text2image.show():
            return   # the parameter node was completed: its Modified event shows it again
        for p in PANELS:
            if not self._views[p.task].show(pn):
                return   # the parameter node was completed: its Modified event shows it again
            if p.task not in self._jobs:
                inputs = list(getattr(pn, f"{p.task}Inputs")) if p.takesInputs else []
                view = self._views[p.task]
                ready, why = panels.canApply(p, getattr(pn, f"{p.task}Model"), inputs, view.slots,
                                             view.modelView.healthy, getattr(pn, f"{p.task}Healthy", None))
                button = self._widget(p.task, "ApplyButton")
                button.enabled, button.toolTip = ready, _(why)
        if "compare" not in self._jobs:
            self.ui.compareShowButton.enabled = bool(pn.compareInput and pn.compareResult)
            self.ui.compareMetricsButton.enabled = bool(pn.compareResult and pn.compareReference)

    def _setRunning(self, panel, running) -> None:
        button = self._widget(panel, "ApplyButton" if panel != "compare" else "MetricsButton")
        bar = self._widget(panel, "ProgressBar")
        if running:
            button.text, button.toolTip, button.enabled = _("Cancel"), _("Stop the run; the scene is left as it was"), True
            bar.value = 0
            bar.show()
        else:
            button.text = _("Apply") if panel != "compare" else _("Compute metrics")
            bar.hide()
            self._onParameterNodeModified()

    # ---- runs -------------------------------------------------------------------------------

    def _toggleRun(self, panel, start) -> None:
        """Apply (start) or Cancel: the same button."""
        if panel in self._jobs:
            self._jobs.pop(panel).cancel()   # returns at once
            self._widget(panel, "StatusLabel").text = _("Cancelled.")
            self._setRunning(panel, False)
            return
        if not install.ensureDependencies():
            return
        with slicer.util.tryWithErrorDisplay(_("DiffusionMIC could not start."), waitCursor=True):
            self._jobs[panel] = start()
            self._widget(panel, "StatusLabel").text = _("Starting...")
            self._setRunning(panel, True)
            self._timer.start()

    def onApply(self, task) -> None:
        p, pn = panels.panel(task), self._parameterNode
        sampling = {key: getattr(getattr(pn, task), key) for key in catalog.FALLBACK_DEFAULTS}
        extras = {name: getattr(pn, f"{task}{name[0].upper()}{name[1:]}") for name in p.extraOptions}
        options = panels.runOptions(p, sampling, extras, pn.device, self._views[task].modelView)
        inputs = list(getattr(pn, f"{task}Inputs"))[:len(self._views[task].slots)] if p.takesInputs else []
        self._toggleRun(task, lambda: self.logic.start(
            task, inputs, getattr(pn, f"{task}Model"), outputNode=getattr(pn, f"{task}Output"),
            onProgress=lambda j: self._onProgress(task, j), onFinished=lambda r: self._onFinished(task, r),
            onError=lambda e: self._onError(task, e), **options))

    def onComputeMetrics(self) -> None:
        pn = self._parameterNode
        self._toggleRun("compare", lambda: self.logic.startCompare(
            pn.compareResult, pn.compareReference, task=None if pn.compareTask == "auto" else pn.compareTask,
            maskNode=pn.compareMask, tableNode=pn.compareTable, inputNode=pn.compareInput,
            onFinished=lambda r: self._onFinished("compare", r), onError=lambda e: self._onError("compare", e)))

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
        pn = self._parameterNode
        if panel == "compare":
            pn.compareTable = result.outputNode   # the next comparison adds a row
            self.ui.compareTableView.setMRMLTableNode(result.outputNode)
            self.ui.compareStatusLabel.text = _("Metrics in table '{name}'.").format(name=result.outputNode.GetName())
            return
        p = panels.panel(panel)
        wall = result.info.get("wall_time_s")
        self._widget(panel, "StatusLabel").text = (_("Done: {node}").format(node=result.outputNode.GetName())
                                                   + (f" ({wall} s)" if wall else ""))
        if p.showsScore:
            score = result.info.get("score")
            self._widget(panel, "ScoreLabel").text = "-" if score is None else f"{score:.4g}"
        if p.feedsCompare and result.inputNodes:
            pn.compareInput, pn.compareResult, pn.compareTask = result.inputNodes[0], result.outputNode, panel

    def _onError(self, panel, error) -> None:
        self._widget(panel, "StatusLabel").text = _("Failed.")
        slicer.util.errorDisplay(_("DiffusionMIC {task} failed:\n{error}").format(task=panel, error=error))

    def onShowSideBySide(self) -> None:
        pn = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Cannot show side by side."), waitCursor=True):
            self.logic.showSideBySide(pn.compareInput, pn.compareResult)


class DiffusionMICTest(ScriptedLoadableModuleTest, selftest.AllPanels):
    """Every panel's Logic end to end on the simulated phantom (body: DiffusionMICModule/selftest.py).
    Skipped, with the reason, where torch or MONAI are missing (the extension build machines)."""

    def setUp(self):
        reason = selftest.skipReason()
        if reason:
            self.skipTest(reason)
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        reason = selftest.skipReason()
        if reason:   # Reload and Test: say why instead of failing
            self.delayDisplay(reason)
            return
        self.setUp()
        self.test_DiffusionMIC_all_panels()

    def test_DiffusionMIC_all_panels(self):
        self.allPanels()
