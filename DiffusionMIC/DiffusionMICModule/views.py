"""Slice views of the DiffusionMIC module: input and result side by side, linked, and back.

Only MRML (no Qt): it works on any scene that has a layout node and slice nodes, which is how
it is tested on slicer-core; Slicer's layout manager follows the same nodes.
"""
from __future__ import annotations

import json

import vtk

import slicer

SAVED_VIEWS = "DiffusionMIC.viewNodeIDsBeforeSideBySide"   # on a segmentation's display node
_layoutObservers: dict = {}   # layout node -> observer tag (one per layout node)


def sliceCompositeNode(layoutName: str):
    for node in slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode"):
        if node.GetLayoutName() == layoutName:
            return node
    return None


def sliceNode(layoutName: str):
    for node in slicer.util.getNodesByClass("vtkMRMLSliceNode"):
        if node.GetLayoutName() == layoutName:
            return node
    return None


def viewNodeIDs(display) -> list[str]:
    """The views a display node is limited to ([] means all views)."""
    return [display.GetNthViewNodeID(i) for i in range(display.GetNumberOfViewNodeIDs())]


def _limitToRightView(display) -> None:
    """Show a segmentation in the Yellow view (and the 3D views) only; remember where it was shown."""
    if not display.GetAttribute(SAVED_VIEWS):   # the first side-by-side keeps the user's own setting
        display.SetAttribute(SAVED_VIEWS, json.dumps(viewNodeIDs(display)))
    yellowSlice = sliceNode("Yellow")
    display.RemoveAllViewNodeIDs()
    if yellowSlice is not None:
        display.AddViewNodeID(yellowSlice.GetID())
        for view in slicer.util.getNodesByClass("vtkMRMLViewNode"):
            display.AddViewNodeID(view.GetID())


def restoreSegmentationViews(scene=None) -> int:
    """Show every segmentation that side-by-side limited to one view where it was shown before;
    returns how many were restored."""
    scene = scene or slicer.mrmlScene
    restored = 0
    for display in slicer.util.getNodesByClass("vtkMRMLSegmentationDisplayNode", scene):
        saved = display.GetAttribute(SAVED_VIEWS)
        if not saved:
            continue
        display.RemoveAllViewNodeIDs()
        for viewID in json.loads(saved):
            display.AddViewNodeID(viewID)
        display.RemoveAttribute(SAVED_VIEWS)
        restored += 1
    return restored


def _watchLayout(layout) -> None:
    """Restore the segmentations' views once the layout leaves side by side (the user picks another)."""
    if layout in _layoutObservers:
        return

    def onLayoutModified(caller, event):
        if caller.GetViewArrangement() != slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView:
            caller.RemoveObserver(_layoutObservers.pop(caller))
            restoreSegmentationViews(caller.GetScene())

    _layoutObservers[layout] = layout.AddObserver(vtk.vtkCommand.ModifiedEvent, onLayoutModified)


def showSideBySide(leftVolume, rightNode, background=None) -> None:
    """Red view: `leftVolume`; Yellow view: `rightNode` (a volume, or a segmentation drawn on
    `background`); same orientation, linked. Uses the scene's layout node (Slicer's GUI has one).
    A segmentation is limited to the right view until the layout changes again."""
    layout = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLLayoutNode")
    red, yellow = sliceCompositeNode("Red"), sliceCompositeNode("Yellow")
    isSegmentation = rightNode.IsA("vtkMRMLSegmentationNode")
    if red is not None:
        red.SetBackgroundVolumeID(leftVolume.GetID())
        red.SetForegroundVolumeID(None)
        red.SetLabelVolumeID(None)
    if yellow is not None:
        yellowVolume = (background or leftVolume) if isSegmentation else rightNode
        yellow.SetBackgroundVolumeID(yellowVolume.GetID())
        yellow.SetForegroundVolumeID(None)
        yellow.SetLabelVolumeID(None)
    if isSegmentation and rightNode.GetDisplayNode() is not None:
        _limitToRightView(rightNode.GetDisplayNode())
    redSlice, yellowSlice = sliceNode("Red"), sliceNode("Yellow")
    if redSlice is not None and yellowSlice is not None:
        yellowSlice.SetOrientation(redSlice.GetOrientation())
    for composite in (red, yellow):
        if composite is not None:
            composite.SetLinkedControl(True)
            composite.SetHotLinkedControl(True)
    if layout is not None:
        layout.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
        if isSegmentation:
            _watchLayout(layout)
