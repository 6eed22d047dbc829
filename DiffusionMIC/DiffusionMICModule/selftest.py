"""The body of DiffusionMICTest: every panel's Logic end to end inside Slicer, on the locally
simulated brain phantom.

A task uses its catalog model when one is on this computer, else a tiny model trained here for a
few steps (seconds to minutes on a CPU). Without torch or MONAI (the extension build machines,
where pip_ensure does not install in testing mode) the test is skipped with the reason.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time

import numpy as np

import slicer

from . import install, mrml, panels, views
from .backend import BackendError
from .jobs import DiffusionMICResult
from .logic import DiffusionMICLogic

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


def skipReason() -> str | None:
    """Why the self-test cannot run here (missing Python packages), or None."""
    missing = install.missingDependencies()
    if not missing:
        return None
    return ("DiffusionMIC self-test skipped: Python packages missing (" + ", ".join(missing)
            + "); install them with Settings > Check / install Python packages")


class AllPanels:
    """Mixed into DiffusionMICTest (a ScriptedLoadableModuleTest)."""

    def _node_count(self):
        return slicer.mrmlScene.GetNumberOfNodes()

    def _model(self, logic, task, workDir, phantomDir):
        for entry in logic.models(task):
            model = entry.get("path", entry["name"])   # fine-tuned models are listed with their folder
            if logic.modelCard(model) is not None:
                return model
        out = os.path.join(workDir, f"model-{task}")
        job = logic.startTrain(task, phantomDir, out, maxSteps=5, config={**TINY, **TASK_SETTINGS.get(task, {})})
        try:
            job.wait()
        except BackendError as e:
            self.delayDisplay(f"{task}: skipped ({e})")
            return None
        return out

    def _assertSameGeometry(self, node, reference):
        self.assertEqual(node.GetImageData().GetDimensions(), reference.GetImageData().GetDimensions())
        np.testing.assert_allclose(mrml.ijkToRAS(node), mrml.ijkToRAS(reference), atol=1e-6)

    def allPanels(self):
        self.delayDisplay("Simulating the DiffusionMIC brain phantom")
        logic = DiffusionMICLogic()
        nodes = {n.GetName(): n for n in logic.loadSamplePhantom(seed=0)}
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
                # The inputs as the Segment panel picks them: one selector per input the card names.
                slots = panels.inputSlots(panels.panel("segment"), card)
                self.assertEqual([s.contrast for s in slots], card.get("inputs") or [""])
                inputs = panels.matchInputs(slots, [(n.GetName(), n) for n in nodes.values()])
                self.assertTrue(all(inputs))
                segmentation = logic.segment(inputs, model=model, steps=2, ensemble=2)
                # Side by side limits the segmentation to the right view; leaving the layout restores it.
                logic.showSideBySide(inputs[0], segmentation)
                slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLLayoutNode").SetViewArrangement(
                    slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView)
                self.assertEqual(views.viewNodeIDs(segmentation.GetDisplayNode()), [])
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
