"""DiffusionMICLogic: runs DiffusionMICLib on MRML nodes, from the panels or the Python console.

Needs no Qt: on slicer-core (outside Slicer) it works the same, which is how it is tested.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile

import slicer

from . import catalog, install, mrml, results, views
from .backend import BackendError
from .compat import HAVE_QT, ScriptedLoadableModuleLogic, hasApp
from .jobs import DiffusionMICJob, DiffusionMICResult
from .panels import TASKS
from .parameters import DiffusionMICParameterNode
from .results import ATTRIBUTE

SAMPLERS = catalog.SAMPLERS


class DependencyError(RuntimeError):
    """torch or a package of Resources/requirements.txt is missing: nothing was started."""


class DiffusionMICLogic(ScriptedLoadableModuleLogic):
    """Runs DiffusionMICLib on MRML nodes; usable from the Python console and outside Slicer.

    Blocking, one method per task (nodes in, nodes out)::

        logic = DiffusionMICLogic()
        t1, t2, pd, flair, t1clean, labels = logic.loadSamplePhantom()   # simulated here, not downloaded
        denoised = logic.denoise(t1, model="brain-mri-denoise", steps=10)
        segmentation = logic.segment([t1, t2, pd, flair], model="brain-mri-lesion-segment", ensemble=5)
        anomalyMap = logic.anomaly(flair, model="brain-mri-anomaly")   # score: logic.lastResult.info["score"]
        synthetic = logic.translate([t1, t2], model="brain-mri-t1t2-to-flair")
        generated = logic.generate(model="brain-mri-generate", count=2)  # a list of volume nodes
        table = logic.compare(denoised, t1clean)

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
        if hasApp():
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

    torchInstalled = staticmethod(install.torchInstalled)
    requirements = staticmethod(install.requirements)
    missingRequirements = staticmethod(install.missingRequirements)

    @staticmethod
    def ensureDependencies() -> None:
        """Raise DependencyError unless torch and requirements.txt are installed; in Slicer's
        application first offer to install them (the user is asked). Runs before any backend call."""
        if hasApp():
            if not install.ensureDependencies():
                raise DependencyError("DiffusionMIC's Python packages are not installed")
            return
        missing = install.missingDependencies()
        if missing:
            raise DependencyError("DiffusionMIC needs these Python packages: " + ", ".join(missing))

    # ---- models -----------------------------------------------------------------------------

    @staticmethod
    def models(task) -> list:
        """Catalog entries for a task: [{"name", "task", "description"}] (`diffusion-mic models list`),
        then the task's models made by startFineTune (with their "path")."""
        return catalog.modelsForTask(task) + catalog.finetunedModels(task)

    @staticmethod
    def modelCard(model):
        """The model card (dict) of a catalog name or model folder; None if not on this computer."""
        return catalog.readCard(model) if model else None

    def cardDefaults(self, model) -> dict:
        """sampler, steps, seed, strength, ensemble, guidance a run of `model` uses by default."""
        return catalog.cardDefaults(self.modelCard(model))

    # ---- runs -------------------------------------------------------------------------------

    def _tempDir(self) -> str:
        base = slicer.app.temporaryPath if hasApp() else None
        return tempfile.mkdtemp(prefix="DiffusionMIC-", dir=base)

    def _startJob(self, task, args, finish, onProgress=None, onFinished=None, onError=None, tempDir=None,
                  writeInputs=None):
        self.ensureDependencies()
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
              strength=None, ensemble=None, guidance=None, count=None, condition=None, device=None, adapt=None,
              sigma=None, lesionLoad=None, healthy=None, show=True, onProgress=None, onFinished=None,
              onError=None) -> DiffusionMICJob:
        """Start `diffusion-mic run TASK` on the input nodes in the background; returns the job.

        None options take the model card's defaults. `adapt` (denoise): self-supervised steps that
        first fit a temporary copy of the model to the input (`run --adapt`); 0 or None: none.
        `sigma` (denoise): the input's noise standard deviation for a model told the noise level
        (`run --sigma`; None: estimated). `lesionLoad` (generate, a lesion-map model, condition
        "lesion", no lesion mask): mL of lesion composed of the model's training lesions (`run
        --lesion-load`; 0 or None: one training subject's lesions). `healthy` (anomaly): a data set
        folder of healthy subjects of the inputs' protocol; `model` is then a segment model and the
        map is tissue where those subjects, registered onto the input, have none (`run --healthy`).
        The inputs are written to a
        temporary folder (removed afterwards); the results are brought into the scene when the job
        is polled after the backend has finished.
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
        card = self.modelCard(model)
        sceneInputs = inputNodes       # where results are placed; inputNodes: what the backend reads
        if task == "generate":      # a model trained from label maps takes one (card inputs: ["labels"])
            fromLabels = "labels" in ((card or {}).get("inputs") or [])
            lesionMap = bool(((card or {}).get("training") or {}).get("lesion_map"))   # an optional lesion mask
            inputNodes = [n for n in inputNodes if n is not None] if lesionMap else inputNodes
            if fromLabels and (len(inputNodes) != 1 or inputNodes[0] is None):
                raise ValueError("this model generates images from a label map: give one label map volume "
                                 "or segmentation")
            if lesionMap and (len(inputNodes) > 1 or (inputNodes and condition != "lesion")):
                raise ValueError("this model takes one lesion mask (a label map or segmentation), with the "
                                 "condition 'lesion'")
            if not fromLabels and not lesionMap and inputNodes:
                raise ValueError("generate takes no input volume (this model draws on its own grid)")
            if inputNodes and inputNodes[0].IsA("vtkMRMLSegmentationNode"):
                segmentation = inputNodes[0].GetSegmentation()
                labels = ((card or {}).get("labels") or {}) if fromLabels else {    # a lesion mask: every segment
                    segmentation.GetNthSegment(i).GetName(): 1 for i in range(segmentation.GetNumberOfSegments())}
                try:     # segments named as the card's labels -> its label values, outside the scene
                    labelNode = mrml.labelVolumeFromSegmentation(inputNodes[0], labels)
                except mrml.SceneError as e:
                    raise ValueError(str(e)) from None
                labelNode.SetAndObserveTransformNodeID(inputNodes[0].GetTransformNodeID())
                inputNodes = [labelNode]
        elif not inputNodes or any(n is None for n in inputNodes):
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
        options = {"sampler": sampler, "steps": steps, "seed": seed, "strength": strength, "ensemble": ensemble,
                   "guidance": guidance, "device": device}
        if task == "generate":
            options.update(count=count, condition=condition)
        if adapt:
            if task != "denoise":
                raise ValueError("only denoise adapts to the scan (adapt)")
            options["adapt"] = int(adapt)
        if lesionLoad:
            if task != "generate" or not lesionMap:
                raise ValueError("only a generator with a lesion map takes a lesion load (lesionLoad)")
            options["lesion-load"] = float(lesionLoad)
        if healthy:
            if task != "anomaly":
                raise ValueError("only anomaly takes a healthy cohort (healthy)")
            if not os.path.isdir(str(healthy)):
                raise ValueError(f"healthy: '{healthy}' is not a folder (a data set of healthy subjects)")
            options["healthy"] = str(healthy)
        if sigma is not None:
            if task != "denoise":
                raise ValueError("only denoise takes the input's noise level (sigma)")
            options["sigma"] = float(sigma)

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
            result = results.importResults(task, model, card, sceneInputs, outputNode, info, grid=inputNodes[0]
                                           if inputNodes else None)
            if show:
                results.showResult(result)
            self.lastResult = result
            return result

        return self._startJob(task, args, finish, onProgress, onFinished, onError, writeInputs=writeInputs)

    def run(self, task, inputNodes, model, outputNode=None, **options) -> DiffusionMICResult:
        """Blocking `start`: returns the DiffusionMICResult, or raises the backend's error."""
        return self.start(task, inputNodes, model, outputNode, **options).wait()

    def generate(self, model, outputNode=None, count=1, condition=None, labelNode=None, **options) -> list:
        """New volume(s) sampled from `model` (its card gives the grid), or, with a model trained
        from label maps, images matching `labelNode` on its grid: a label map volume, or a
        Segmentation node whose segments are named as the model's labels (CSF, GM, WM, lesion),
        drawn on its reference geometry. A model with a lesion map (card training "lesion_map")
        takes an optional lesion mask as `labelNode` with condition="lesion" (a label map, or a
        Segmentation whose every segment is lesion); its volume is the lesion load. Returns a list
        of nodes."""
        inputs = [labelNode] if labelNode is not None else []
        result = self.run("generate", inputs, model, outputNode, count=count, condition=condition, **options)
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
        reference "DiffusionMIC.mask", the score the attribute "DiffusionMIC.score". With
        healthy=FOLDER, `model` is a segment model and the map is tissue out of place against those
        healthy subjects (e.g. anomaly([t1, t2, pd, flair], "brain-mri-lesion-segment", healthy=...))."""
        return self.run("anomaly", inputNodes, model, outputNode, **options).outputNode

    # ---- compare ---------------------------------------------------------------------------------

    def showSideBySide(self, inputNode, resultNode) -> None:
        """Input (left, Red) and result (right, Yellow) side by side, linked views. A segmentation
        result is drawn in the right view only until the layout is changed again."""
        if inputNode is None or resultNode is None:
            raise ValueError("choose an input and a result to compare")
        views.showSideBySide(inputNode, resultNode)
        if hasApp() and slicer.app.layoutManager() is not None:
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

    # ---- sample data and training ----------------------------------------------------------

    def startPhantom(self, seed=0, noise=3.0, lesions=3, resolution=2.0, onProgress=None, onFinished=None,
                     onError=None) -> DiffusionMICJob:
        """Simulate one phantom subject (`diffusion-mic phantom`) in the background and load it
        into the scene, in a subject-hierarchy folder "DiffusionMIC brain phantom"."""

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

    def loadSamplePhantom(self, seed=0, noise=3.0, lesions=3, resolution=2.0) -> list:
        """The "DiffusionMIC brain phantom" sample data, simulated here (nothing is downloaded):
        [T1, T2, PD, FLAIR, clean T1, label map] nodes. The Sample Data button calls this;
        SampleData's downloadSample() cannot (it ignores custom downloaders)."""
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

    def startFineTune(self, task, model, dataDir, name, loraRank=8, maxSteps=None, onProgress=None, onFinished=None,
                      onError=None) -> DiffusionMICJob:
        """`diffusion-mic finetune TASK --model M --data DIR` in the background. The model is written
        in the job's temporary folder and moved to catalog.finetunedDir()/name when it is complete,
        where models(task) lists it; a cancelled or failed run leaves nothing there."""
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
        if not model:
            raise ValueError(f"choose the {task} model to fine-tune")
        if not dataDir or not os.path.isdir(dataDir):
            raise ValueError(f"the data set folder '{dataDir}' does not exist")
        if not name or os.path.basename(name) != name or name.startswith("."):
            raise ValueError(f"'{name}' is not a plain folder name")
        target = catalog.finetunedDir() / name
        if target.exists():
            raise ValueError(f"a model named '{name}' exists already in {target.parent}")

        def args(folder):
            out = ["finetune", task, "--model", model, "--data", dataDir, "--out", os.path.join(folder, "model"),
                   "--lora-rank", loraRank, "--progress", "json"]
            return out + (["--max-steps", maxSteps] if maxSteps else [])

        def finish(info):
            built = info["model"]
            shutil.rmtree(os.path.join(built, "checkpoint"), ignore_errors=True)   # resume state, not the model
            # The temporary folder may be on another file system: copy beside the target, then rename.
            partial = target.with_name(f".{name}.partial")
            shutil.rmtree(partial, ignore_errors=True)
            shutil.move(built, partial)
            os.replace(partial, target)
            return DiffusionMICResult("finetune", None, {}, dict(info, model=str(target)))

        return self._startJob("finetune", args, finish, onProgress, onFinished, onError)
