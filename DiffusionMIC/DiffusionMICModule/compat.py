"""Stand-ins used when DiffusionMIC.py is imported outside Slicer's application, on slicer-core
(real MRML, no Qt): there `slicer.ScriptedLoadableModule`, `slicer.parameterNodeWrapper` and
`slicer.i18n` do not exist because they import qt/ctk.

Only what the Logic needs works here: `ScriptedLoadableModuleLogic.getParameterNode()` returns
the module's singleton vtkMRMLScriptedModuleNode as in Slicer; the parameter node wrapper
classes keep their annotations and defaults (as plain dataclasses) but do not wrap a node.
The Widget and the module class are only ever instantiated by Slicer itself.
"""
from __future__ import annotations

import dataclasses
import unittest

import slicer


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
        else:
            setattr(cls, name, None)
    return dataclasses.dataclass(cls)


parameterPack = _asDataclass
parameterNodeWrapper = _asDataclass
