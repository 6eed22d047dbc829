"""MRML scene helpers of the DiffusionMIC module: volumes to and from files, geometry, subject
hierarchy, segmentations and metric tables (slice views: views.py).

Only MRML (no Qt): all of this runs on slicer-core outside Slicer as well as inside it.
Every function that creates nodes leaves the scene as it was if it fails.
"""
from __future__ import annotations

import contextlib
import math
import os

import numpy as np
import vtk

import slicer

TAG_LABEL_VALUE = "DiffusionMIC.labelValue"

# Colours (RGB 0-1) of tissue and lesion names a model card may use; others take the palette.
NAMED_COLOURS = {
    "csf": (0.33, 0.62, 0.90), "gm": (0.55, 0.55, 0.55), "grey matter": (0.55, 0.55, 0.55),
    "gray matter": (0.55, 0.55, 0.55), "wm": (0.96, 0.93, 0.82), "white matter": (0.96, 0.93, 0.82),
    "lesion": (0.95, 0.20, 0.15), "tumor": (0.95, 0.20, 0.15), "tumour": (0.95, 0.20, 0.15),
    "edema": (0.95, 0.80, 0.20), "oedema": (0.95, 0.80, 0.20), "anomaly": (1.0, 0.25, 0.0),
}
PALETTE = [(0.90, 0.30, 0.24), (0.18, 0.55, 0.34), (0.20, 0.40, 0.80), (0.95, 0.75, 0.10),
           (0.60, 0.30, 0.70), (0.10, 0.70, 0.75), (0.95, 0.50, 0.20), (0.55, 0.35, 0.20)]
# Colour maps for continuous maps (anomaly, uncertainty), the first one the scene has.
HEAT_COLOUR_NODE_IDS = ("vtkMRMLColorTableNodeFileInferno.txt", "vtkMRMLColorTableNodeFileColdToHotRainbow.txt",
                        "vtkMRMLColorTableNodeRainbow")


class SceneError(RuntimeError):
    pass


def scene() -> "slicer.vtkMRMLScene":
    return slicer.mrmlScene


# ---- geometry and files ------------------------------------------------------------------------

def ijkToRAS(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def dimensions(node) -> tuple[int, int, int]:
    image = node.GetImageData()
    if image is None:
        raise SceneError(f"volume '{node.GetName()}' has no voxels")
    return tuple(image.GetDimensions())


def writeVolume(node, path: str) -> str:
    """Write a volume node (node coordinates, no parent transform) to a NRRD/NIfTI file."""
    if node is None or node.GetImageData() is None:
        raise SceneError(f"volume '{node.GetName() if node else None}' has no voxels")
    if node.GetImageData().GetNumberOfScalarComponents() != 1:
        raise SceneError(f"volume '{node.GetName()}' is not a scalar volume (it has several components)")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(path)
    storage.UseCompressionOff()
    if not storage.WriteData(node) or not os.path.isfile(path):
        raise SceneError(f"cannot write volume '{node.GetName()}' to '{path}'")
    return path


def readVolume(path: str, className: str = "vtkMRMLScalarVolumeNode"):
    """Read a volume file into a new node that is NOT in the scene (so a failure leaves none behind)."""
    node = getattr(slicer, className)()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(path)
    storage.SetSingleFile(True)
    if not os.path.isfile(path) or not storage.ReadData(node) or node.GetImageData() is None:
        raise SceneError(f"cannot read the backend's output '{path}'")
    return node


def checkSameGrid(node, reference, what: str) -> None:
    """The backend promises outputs on the input's exact grid: check it before trusting it."""
    if dimensions(node) != dimensions(reference):
        raise SceneError(f"{what} has {dimensions(node)} voxels, the input {dimensions(reference)}")
    if not np.allclose(ijkToRAS(node), ijkToRAS(reference), rtol=0, atol=1e-3):
        raise SceneError(f"{what} is not on the input's voxel grid")


# ---- committing results to the scene -------------------------------------------------------------

class Staging:
    """Nodes created for one result; `rollback()` removes them all (no half-made results)."""

    def __init__(self):
        self.created: list = []

    def add(self, className: str, name: str):
        node = slicer.mrmlScene.AddNewNodeByClass(className, slicer.mrmlScene.GenerateUniqueName(name))
        self.created.append(node)
        return node

    def rollback(self) -> None:
        for node in reversed(self.created):
            removeNode(node)
        self.created.clear()


def removeNode(node) -> None:
    """Remove a node with its display and storage nodes."""
    if node is None or node.GetScene() is None:
        return
    scene = node.GetScene()
    sh = scene.GetFirstNodeByClass("vtkMRMLSubjectHierarchyNode")   # look, do not create one
    item = sh.GetItemByDataNode(node) if sh is not None else 0
    if item:
        sh.RemoveItem(item, False, False)
    if node.IsA("vtkMRMLDisplayableNode"):
        for i in range(node.GetNumberOfDisplayNodes() - 1, -1, -1):
            display = node.GetNthDisplayNode(i)
            if display is not None and display.GetScene() is not None:
                scene.RemoveNode(display)
    if node.IsA("vtkMRMLStorableNode"):
        for i in range(node.GetNumberOfStorageNodes() - 1, -1, -1):
            storage = node.GetNthStorageNode(i)
            if storage is not None and storage.GetScene() is not None:
                scene.RemoveNode(storage)
    scene.RemoveNode(node)


def commitVolume(staging: Staging, source, name: str, outputNode=None, like=None,
                 className: str = "vtkMRMLScalarVolumeNode"):
    """Put the voxels of `source` (a node outside the scene) into `outputNode` or a new node.

    With `like` (the input), the result gets exactly the input's IJKToRAS matrix and parent
    transform; otherwise the file's geometry.
    """
    node = outputNode if outputNode is not None else staging.add(className, name)
    matrix = vtk.vtkMatrix4x4()
    (like or source).GetIJKToRASMatrix(matrix)
    node.SetIJKToRASMatrix(matrix)
    node.SetAndObserveImageData(source.GetImageData())
    if like is not None:
        node.SetAndObserveTransformNodeID(like.GetTransformNodeID())
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node


def placeBeside(node, reference=None) -> None:
    """Put `node` in the subject hierarchy next to `reference` (same parent), else at the top."""
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    if sh is None:
        return
    parent = sh.GetSceneItemID()
    if reference is not None:
        refItem = sh.GetItemByDataNode(reference)
        if refItem:
            parent = sh.GetItemParent(refItem)
    item = sh.GetItemByDataNode(node)
    if item:
        sh.SetItemParent(item, parent)
    else:
        sh.CreateItem(parent, node)


def setHeatDisplay(node, lower: float | None = None) -> None:
    """A colour map (and optional lower threshold, transparent below) for a continuous map."""
    display = node.GetDisplayNode()
    if display is None:
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
    if display is None:
        return
    for colourID in HEAT_COLOUR_NODE_IDS:
        if slicer.mrmlScene.GetNodeByID(colourID) is not None:
            display.SetAndObserveColorNodeID(colourID)
            break
    array = slicer.util.arrayFromVolume(node)
    lo, hi = float(np.min(array)), float(np.max(array))
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(lo, hi if hi > lo else lo + 1.0)
    if lower is not None and math.isfinite(lower):
        display.SetApplyThreshold(1)
        display.SetThreshold(lower, max(hi, lower))


# ---- segmentations --------------------------------------------------------------------------

def segmentColour(name: str, index: int) -> tuple[float, float, float]:
    return NAMED_COLOURS.get(name.strip().lower(), PALETTE[index % len(PALETTE)])


def _asIntegerLabelmap(source):
    """`source` as a vtkMRMLLabelMapVolumeNode outside the scene, with integer voxels."""
    labelmap = slicer.vtkMRMLLabelMapVolumeNode()
    matrix = vtk.vtkMatrix4x4()
    source.GetIJKToRASMatrix(matrix)
    labelmap.SetIJKToRASMatrix(matrix)
    array = slicer.util.arrayFromVolume(source)
    if array.dtype.kind == "f":
        array = np.rint(array)
    image = vtk.vtkImageData()
    labelmap.SetAndObserveImageData(image)
    slicer.util.updateVolumeFromArray(labelmap, np.ascontiguousarray(array.astype(np.int16)))
    return labelmap


def commitSegmentation(staging: Staging, source, name: str, reference, labels: dict[str, int] | None = None,
                       outputNode=None, emptySegments: list[str] | None = None):
    """A Segmentation node from a label map file's voxels, segments named and coloured from
    `labels` ({name: value}, background 0 skipped); `emptySegments` adds named empty segments
    for labels that are absent (e.g. an anomaly mask with nothing found).

    The voxels are in `reference`'s own coordinates, so the segmentation goes under the
    reference's parent transform, as commitVolume does for volumes.
    """
    labelmap = _asIntegerLabelmap(source)
    node = outputNode if outputNode is not None else staging.add("vtkMRMLSegmentationNode", name)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    # ImportLabelmapToSegmentationNode maps the label map (world coordinates: it is outside the
    # scene) into the segmentation's parent frame; with no parent transform it is copied as is.
    node.SetAndObserveTransformNodeID(None)
    node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    segmentation = node.GetSegmentation()
    segmentation.RemoveAllSegments()
    present = set(int(v) for v in np.unique(slicer.util.arrayFromVolume(labelmap)) if v != 0)
    if present and not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, node):
        raise SceneError(f"cannot make segmentation '{name}' from the backend's label map")
    names = {int(v): n for n, v in (labels or {}).items()}
    ids = vtk.vtkStringArray()
    segmentation.GetSegmentIDs(ids)
    for i in range(ids.GetNumberOfValues()):
        segment = segmentation.GetSegment(ids.GetValue(i))
        value = int(segment.GetLabelValue())
        segName = names.get(value, f"label {value}")
        segment.SetName(segName)
        segment.SetColor(*segmentColour(segName, value - 1))
        segment.SetTag(TAG_LABEL_VALUE, str(value))
    for segName in emptySegments or []:
        if segmentation.GetSegmentIdBySegmentName(segName) == "":
            value = int((labels or {}).get(segName, 1))
            segmentID = segmentation.AddEmptySegment("", segName, segmentColour(segName, value - 1))
            segmentation.GetSegment(segmentID).SetTag(TAG_LABEL_VALUE, str(value))
    node.SetAttribute("DiffusionMIC.labels", ",".join(f"{n}={v}" for n, v in (labels or {}).items()))
    node.SetAndObserveTransformNodeID(reference.GetTransformNodeID())
    return node


def segmentNames(node) -> list[str]:
    seg = node.GetSegmentation()
    return [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]


def segmentLabelValue(segment, index: int) -> int:
    """The label value a segment stands for: our tag, else Slicer's label value, else index + 1."""
    ref = vtk.reference("")
    if segment.GetTag(TAG_LABEL_VALUE, ref) and str(ref).strip().lstrip("-").isdigit():
        return int(str(ref))
    if segment.GetLabelValue() > 0:
        return int(segment.GetLabelValue())
    return index + 1


@contextlib.contextmanager
def scratchNodes():
    """Every node added to the scene inside the block is removed at its end: Slicer's export
    logic adds a colour table beside each temporary label map it fills."""
    scene = slicer.mrmlScene
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    try:
        yield
    finally:
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for n in added:
            if n.GetID() not in before and n.GetScene() is not None:
                scene.RemoveNode(n)


def labelArrayFromSegmentation(node, reference, valueOf: dict[str, int] | None = None) -> np.ndarray:
    """A (k, j, i) label array on `reference`'s grid; each segment takes `valueOf[name]`, its
    stored label value, or its position + 1."""
    out = np.zeros(dimensions(reference)[::-1], dtype=np.int16)
    segmentation = node.GetSegmentation()
    with scratchNodes():
        temporary = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__DiffusionMIC_export")
        for i in range(segmentation.GetNumberOfSegments()):
            segmentID = segmentation.GetNthSegmentID(i)
            segment = segmentation.GetSegment(segmentID)
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(segmentID)
            if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(node, ids, temporary, reference):
                raise SceneError(f"cannot export segment '{segment.GetName()}' of '{node.GetName()}'")
            mask = slicer.util.arrayFromVolume(temporary) > 0
            value = (valueOf or {}).get(segment.GetName()) or segmentLabelValue(segment, i)
            out[mask] = value
    return out


def referenceGrid(node):
    """An empty label map node in the scene (call inside `scratchNodes`) on the segmentation's
    reference geometry, under its transform; a segmentation without one raises a SceneError."""
    segmentation = node.GetSegmentation()
    geometry = segmentation.GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    image = slicer.vtkOrientedImageData()
    if not geometry or not slicer.vtkSegmentationConverter.DeserializeImageGeometry(geometry, image):
        raise SceneError(f"segmentation '{node.GetName()}' has no reference geometry: give it a source volume")
    grid = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__DiffusionMIC_grid")
    grid.SetAndObserveTransformNodeID(node.GetTransformNodeID())
    if not slicer.vtkSlicerSegmentationsModuleLogic.CreateLabelmapVolumeFromOrientedImageData(image, grid):
        raise SceneError(f"cannot make a label map of segmentation '{node.GetName()}'")
    return grid


def labelVolumeFromSegmentation(node, labels: dict[str, int]):
    """A label map volume outside the scene from a Segmentation node (e.g. drawn in the Segment
    Editor) on the segmentation's reference geometry: each segment takes the value of the
    `labels` entry of the same name (case does not matter). A segment no label is named after, or
    no segment at all, raises one SceneError line; the scene is left as it was."""
    segmentation = node.GetSegmentation()
    known = {name.lower(): int(value) for name, value in labels.items() if int(value) != 0}
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    if not names:
        raise SceneError(f"segmentation '{node.GetName()}' has no segments")
    unknown = [n for n in names if n.lower() not in known]
    if unknown:
        raise SceneError(f"segment '{unknown[0]}' of '{node.GetName()}' is not a label this model knows "
                         f"({', '.join(n for n, v in labels.items() if int(v) != 0)}): rename it")
    with scratchNodes():
        grid = referenceGrid(node)
        array = labelArrayFromSegmentation(node, grid, {n: known[n.lower()] for n in names})
        out = volumeFromArray(array, grid)
    out.SetName(node.GetName())
    return out


def volumeFromArray(array: np.ndarray, like, className: str = "vtkMRMLLabelMapVolumeNode"):
    """A node outside the scene holding `array` (k, j, i) on `like`'s grid."""
    node = getattr(slicer, className)()
    matrix = vtk.vtkMatrix4x4()
    like.GetIJKToRASMatrix(matrix)
    node.SetIJKToRASMatrix(matrix)
    node.SetAndObserveImageData(vtk.vtkImageData())
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    return node


# ---- metric tables -----------------------------------------------------------------------------

TEXT_COLUMNS = ("Result", "Reference", "Mask", "Task")


def flattenMetrics(metrics, prefix: str = "") -> dict[str, float]:
    """{"a": 1, "b": {"c": 2}} -> {"a": 1.0, "b/c": 2.0}; non-numbers are left out."""
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flattenMetrics(value, name + "/"))
        elif isinstance(value, bool):
            out[name] = float(value)
        elif isinstance(value, (int, float)):
            out[name] = float(value)
        elif value is None:
            out[name] = float("nan")
    return out


def nameLabelColumn(key: str, names: dict[str, str]) -> str:
    """"labels/2/dice" -> "GM/dice" when label value 2 is the segment "GM"."""
    parts = key.split("/")
    if len(parts) == 3 and parts[0] == "labels" and parts[1] in names:
        return f"{names[parts[1]]}/{parts[2]}"
    return key


def addMetricsRow(table, texts: dict[str, str], metrics: dict[str, float]) -> int:
    """Append one row (Result, Reference, Mask, Task, then one column per metric) to a table
    node; columns it lacks are added (NaN in earlier rows). Returns the row index."""
    with slicer.util.NodeModify(table):
        for column in TEXT_COLUMNS:
            if table.GetColumnIndex(column) < 0:
                array = vtk.vtkStringArray()
                array.SetName(column)
                array.SetNumberOfValues(table.GetNumberOfRows())
                table.AddColumn(array)
        for name in metrics:
            if table.GetColumnIndex(name) < 0:
                array = vtk.vtkDoubleArray()
                array.SetName(name)
                array.SetNumberOfValues(table.GetNumberOfRows())
                array.Fill(float("nan"))
                table.AddColumn(array)
        row = table.AddEmptyRow()
        for column in TEXT_COLUMNS:
            table.SetCellText(row, table.GetColumnIndex(column), texts.get(column, ""))
        data = table.GetTable()
        for c in range(table.GetNumberOfColumns()):
            name = table.GetColumnName(c)
            if name in TEXT_COLUMNS:
                continue
            data.GetColumn(c).SetValue(row, metrics.get(name, float("nan")))
        data.Modified()
    return row


def tableRows(table) -> list[dict[str, str]]:
    """The table's rows as {column name: cell text}."""
    return [{table.GetColumnName(c): table.GetCellText(r, c) for c in range(table.GetNumberOfColumns())}
            for r in range(table.GetNumberOfRows())]
