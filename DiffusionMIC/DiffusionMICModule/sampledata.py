"""The "DiffusionMIC brain phantom" sample data set (Slicer's application only).

It is simulated here, not downloaded: SampleData calls its customDownloader (onButton) from
the button only; downloadSample() ignores custom downloaders, so scripts call
DiffusionMICLogic().loadSamplePhantom().
"""
from __future__ import annotations

import slicer

from .catalog import resourcePath
from .compat import tr as _
from .logic import DependencyError, DiffusionMICLogic


def onButton(source=None) -> None:
    """The Sample Data button: dependencies first (asking before installing), then the phantom."""
    logic = DiffusionMICLogic()
    try:
        logic.ensureDependencies()
    except DependencyError:
        return   # the installer has said why
    with slicer.util.tryWithErrorDisplay(_("Could not simulate the DiffusionMIC brain phantom."), waitCursor=True):
        nodes = logic.loadSamplePhantom()
        slicer.util.setSliceViewerLayers(background=nodes[0], fit=True)


def register() -> None:
    """"DiffusionMIC brain phantom": simulated locally (nothing is downloaded). SampleData calls
    customDownloader only from its button; scripts call DiffusionMICLogic().loadSamplePhantom()."""
    import SampleData
    if hasattr(SampleData.SampleDataLogic, "registerCustomSampleDataCategory"):   # Slicer >= 5.11
        SampleData.SampleDataLogic.registerCustomSampleDataCategory("DiffusionMIC", title=_("DiffusionMIC"))
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="DiffusionMIC", sampleName="DiffusionMIC brain phantom",
        thumbnailFileName=resourcePath("Icons/DiffusionMICBrainPhantom.png"),
        # SampleDataSource needs uris, fileNames and nodeNames; they only describe what gets loaded.
        uris="local:DiffusionMICLib.phantom", fileNames="DiffusionMICBrainPhantom.nii.gz",
        nodeNames="DiffusionMIC phantom T1", customDownloader=onButton)
