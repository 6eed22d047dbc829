"""Python dependencies of the module: PyTorch from the PyTorch extension, the rest from
Resources/requirements.txt.

The checks need no Qt (they read package metadata); ensureDependencies() asks the user and
installs, so it runs only in Slicer's application, before anything starts the backend.
"""
from __future__ import annotations

import importlib
import sys

import slicer

from . import catalog
from .compat import tr as _

# The torch versions DiffusionMICLib supports (pyproject.toml's `torch` dependency; a test checks).
TORCH_REQUIREMENT = ">=2.2,<2.14"


def torchInstalled() -> bool:
    """torch is installed in a version TORCH_REQUIREMENT accepts (presence alone is not enough)."""
    return catalog.isSatisfied("torch" + TORCH_REQUIREMENT)


def requirements() -> list[str]:
    return catalog.readRequirements(catalog.resourcePath("requirements.txt"))


def missingRequirements() -> list[str]:
    """Requirements of Resources/requirements.txt not installed in this Python (torch is separate)."""
    return catalog.missingRequirements(requirements())


def missingDependencies() -> list[str]:
    """Everything the backend needs that this Python lacks, torch first."""
    return ([] if torchInstalled() else ["torch" + TORCH_REQUIREMENT]) + missingRequirements()


def _installTorch() -> bool:
    """PyTorch through PyTorchUtils (it picks the CUDA build for the driver), in our version range."""
    try:
        import PyTorchUtils
    except ImportError:
        slicer.util.errorDisplay(_(
            "DiffusionMIC needs PyTorch. Install the 'PyTorch' extension from the Extensions Manager, "
            "restart Slicer, then try again."))
        return False
    wasImported = "torch" in sys.modules
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True,
                                                          torchVersionRequirement=TORCH_REQUIREMENT)
    if torch is None:
        slicer.util.errorDisplay(_("DiffusionMIC cannot run without PyTorch."))
        return False
    importlib.invalidate_caches()
    if wasImported or not torchInstalled():
        slicer.util.errorDisplay(_("PyTorch {version} was installed. Restart Slicer to use it.").format(
            version=catalog.installedVersion("torch") or "?"))
        return False
    return True


def _installRequirements(missing: list[str]) -> bool:
    """The missing requirements.txt packages: slicer.packaging.pip_ensure (Slicer >= 5.11, it asks),
    else slicer.util.pip_install after our own confirmation."""
    try:
        import slicer.packaging as packaging   # Slicer >= 5.11
        pipEnsure = getattr(packaging, "pip_ensure", None)
    except ImportError:
        pipEnsure = None
    try:
        if pipEnsure is not None:
            pipEnsure(packaging.load_requirements(catalog.resourcePath("requirements.txt")), requester="DiffusionMIC")
        else:
            if not slicer.util.confirmOkCancelDisplay(
                    _("DiffusionMIC needs {count} more Python package(s). Install them into Slicer's Python now? "
                      "This can take a few minutes.").format(count=len(missing)),
                    windowTitle=_("DiffusionMIC - Install Python packages"), detailedText="\n".join(missing)):
                return False
            with slicer.util.WaitCursor():
                slicer.util.pip_install(missing)
    except Exception as e:  # noqa: BLE001 - declined or pip failed: say so, do not crash
        slicer.util.errorDisplay(_("Python packages were not installed: {error}").format(error=e))
        return False
    importlib.invalidate_caches()
    return True


def ensureDependencies() -> bool:
    """Check, and after asking install, what the backend needs; True when all is there."""
    if not torchInstalled() and not _installTorch():
        return False
    missing = missingRequirements()
    if missing and not _installRequirements(missing):
        return False
    still = missingDependencies()
    if still:
        slicer.util.errorDisplay(_("Still missing: {packages}. Restart Slicer and try again.").format(
            packages=", ".join(still)))
        return False
    return True
