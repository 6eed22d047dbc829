"""Slicer's Qt-based Python packages, or stand-ins when running on slicer-core (real MRML, no Qt).

Inside Slicer this re-exports `slicer.ScriptedLoadableModule`, `slicer.parameterNodeWrapper`,
`slicer.i18n` and `qt`. Outside it (tests, scripts on slicer-core) those do not exist because
they import qt/ctk; then only what the Logic needs works: `ScriptedLoadableModuleLogic.
getParameterNode()` returns the module's singleton vtkMRMLScriptedModuleNode as in Slicer; the
parameter node wrapper classes keep their annotations and defaults (as plain dataclasses) but
do not wrap a node. The Widget and the module class are only ever instantiated by Slicer itself.
"""
from __future__ import annotations

import dataclasses
import typing
import unittest

import slicer

__all__ = ["HAVE_QT", "Choice", "ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest",
           "ScriptedLoadableModuleWidget", "VTKObservationMixin", "WithinRange", "hasApp", "parameterNodeWrapper",
           "parameterPack", "qt", "tr", "translate"]


def hasApp() -> bool:
    """True inside Slicer's application (not on slicer-core or in PythonSlicer without a GUI)."""
    return HAVE_QT and hasattr(slicer, "app")


try:  # Slicer's application (Qt)
    import qt
    from slicer.i18n import tr, translate
    from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper, parameterPack
    from slicer.ScriptedLoadableModule import (
        ScriptedLoadableModule,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
        ScriptedLoadableModuleWidget,
    )
    from slicer.util import VTKObservationMixin
    HAVE_QT = True
except ImportError:  # slicer-core
    qt = None
    HAVE_QT = False


if not HAVE_QT:
    def tr(text: str) -> str:
        return text

    def translate(context: str, text: str) -> str:
        return text

    class ScriptedLoadableModule:
        def __init__(self, parent):
            raise RuntimeError("the DiffusionMIC module class needs Slicer's application")


    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            raise RuntimeError("the DiffusionMIC widget needs Slicer's application")


    class ScriptedLoadableModuleLogic:
        """The parts of Slicer's ScriptedLoadableModuleLogic that need no Qt."""

        def __init__(self, parent=None):
            self.moduleName = self.__class__.__name__
            if self.moduleName.endswith("Logic"):
                self.moduleName = self.moduleName[:-5]
            self.isSingletonParameterNode = True

        def getParameterNode(self):
            node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node is not None:
                if node.GetAttribute("ModuleName") != self.moduleName:
                    node.SetAttribute("ModuleName", self.moduleName)
                return node
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)
            node.SetSingletonTag(self.moduleName)
            node.SetAttribute("ModuleName", self.moduleName)
            node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
            return slicer.mrmlScene.AddNode(node)


    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, requestedDelay=None, msec=None):
            print(message)


    class _Validator:
        def __init__(self, *args):
            self.args = args


    class Choice(_Validator):
        def __init__(self, choices):
            super().__init__(choices)
            self.choices = list(choices)


    class WithinRange(_Validator):
        def __init__(self, minimum, maximum):
            super().__init__(minimum, maximum)
            self.minimum, self.maximum = minimum, maximum


    def _asDataclass(cls):
        """Annotated fields without a default (MRML nodes) default to None; packs to a new pack."""
        for name, annotation in cls.__annotations__.items():
            if name in cls.__dict__:
                continue
            if dataclasses.is_dataclass(annotation):
                setattr(cls, name, dataclasses.field(default_factory=annotation))
            elif typing.get_origin(annotation) is list:
                setattr(cls, name, dataclasses.field(default_factory=list))
            else:
                setattr(cls, name, None)
        return dataclasses.dataclass(cls)


    parameterPack = _asDataclass
    parameterNodeWrapper = _asDataclass
    VTKObservationMixin = object
