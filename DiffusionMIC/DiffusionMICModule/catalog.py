"""Model catalog, model cards and Python requirements, read without importing torch.

The Slicer module fills its model selectors when the module opens; importing DiffusionMICLib
there would import torch and MONAI into Slicer's GUI process (seconds, and impossible before
PyTorch is installed). So this reads the same JSON files by the same rules as
``DiffusionMICLib.models`` (catalog_path, read_catalog, cache_dir, resolve_model);
Testing/Python/test_slicer_logic.py checks that both agree.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any

CARD = "model.json"
SAMPLERS = ["dpm++2m", "ddim", "unipc", "ddpm"]
# What RunOptions.with_card_defaults falls back to when a card says nothing.
FALLBACK_DEFAULTS = {"sampler": "dpm++2m", "steps": 10, "seed": 0, "strength": 1.0, "ensemble": 1, "guidance": 1.0}


_MODULE_DIR = Path(__file__).resolve().parents[1]   # the folder of DiffusionMIC.py


def resourcePath(filename: str = "") -> str:
    """Resources/ of the installed module (next to DiffusionMIC.py) or of the source checkout (one up)."""
    for base in (_MODULE_DIR, _MODULE_DIR.parent):
        if (base / "Resources").is_dir():
            return str(base / "Resources" / filename)
    return str(_MODULE_DIR / "Resources" / filename)


def libraryRoot() -> Path | None:
    """The folder holding the DiffusionMICLib package that `import DiffusionMICLib` finds (not imported)."""
    spec = importlib.util.find_spec("DiffusionMICLib")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]).resolve().parent


def catalogPath(root: Path | None = None) -> Path | None:
    if os.environ.get("DIFFUSIONMIC_CATALOG"):
        return Path(os.environ["DIFFUSIONMIC_CATALOG"])
    root = root or libraryRoot()
    return None if root is None else root / "Resources" / "Models" / "catalog.json"


def readCatalog(root: Path | None = None) -> list[dict[str, Any]]:
    path = catalogPath(root)
    if path is None or not path.is_file():
        return []
    try:
        return list(json.loads(path.read_text(encoding="utf-8")).get("models", []))
    except (OSError, ValueError):
        return []


def cacheDir() -> Path:
    return Path(os.environ.get("DIFFUSIONMIC_CACHE", Path.home() / ".cache" / "diffusionmic"))


def finetunedDir() -> Path:
    """Where the Fine-tune panel writes task models (one model folder each)."""
    return cacheDir() / "finetuned"


def finetunedModels(task: str) -> list[dict[str, Any]]:
    """The task's models in finetunedDir(): [{"name", "task", "description", "path"}], by name."""
    found = []
    folder = finetunedDir()
    for path in sorted(folder.iterdir()) if folder.is_dir() else ():
        card = readCard(path) if not path.name.startswith(".") else None
        if card and card.get("task") == task:
            tuned = (card.get("training") or {}).get("finetune") or {}
            description = (f"Fine-tuned from {tuned['base_model']}" if tuned.get("base_model")
                           else card.get("description", ""))
            found.append({"name": path.name, "task": task, "path": str(path), "description": description})
    return found


def resolveModel(model: str | os.PathLike, root: Path | None = None) -> Path | None:
    """A model folder for a folder path or catalog name; None if it is not on this computer."""
    path = Path(model)
    if (path / CARD).is_file():
        return path
    for entry in readCatalog(root):
        if entry.get("name") == str(model):
            if "path" in entry:
                return catalogPath(root).parent / entry["path"]
            cached = cacheDir() / entry["name"]
            return cached if (cached / CARD).is_file() else None
    return None


def readCard(model: str | os.PathLike, root: Path | None = None) -> dict[str, Any] | None:
    """The model card (model.json) as a dict, or None if the model is not on this computer."""
    folder = resolveModel(model, root)
    if folder is None or not (folder / CARD).is_file():
        return None
    try:
        return json.loads((folder / CARD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def modelsForTask(task: str, root: Path | None = None) -> list[dict[str, Any]]:
    """Catalog entries of one task: [{"name", "task", "description"}, ...] as `models list` prints."""
    return [{k: e.get(k) for k in ("name", "task", "description") if k in e}
            for e in readCatalog(root) if e.get("task") == task]


def cardDefaults(card: dict[str, Any] | None) -> dict[str, Any]:
    """Sampling parameters a run takes when none is given (RunOptions.with_card_defaults)."""
    out = dict(FALLBACK_DEFAULTS)
    if not card:
        return out
    sampler = card.get("sampler") or {}
    defaults = card.get("defaults") or {}
    if sampler.get("name") in SAMPLERS:
        out["sampler"] = sampler["name"]
    if sampler.get("steps"):
        out["steps"] = int(sampler["steps"])
    for key, kind in (("strength", float), ("ensemble", int), ("guidance", float)):
        if defaults.get(key) is not None:
            out[key] = kind(defaults[key])
    return out


def cardTooltip(card: dict[str, Any] | None, description: str = "") -> str:
    """A short description of a model for its selector's tooltip."""
    if not card:
        return description or "not downloaded yet"
    lines = [card.get("description") or description or card.get("name", "")]
    if card.get("inputs"):
        lines.append("Inputs: " + ", ".join(card["inputs"]))
    if card.get("outputs"):
        lines.append("Output: " + ", ".join(card["outputs"]))
    if card.get("labels"):
        lines.append("Labels: " + ", ".join(f"{n} ({v})" for n, v in card["labels"].items()))
    metrics = card.get("metrics") or {}
    flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    if flat:
        lines.append("Held-out metrics: " + ", ".join(f"{k} {v:.3g}" for k, v in list(flat.items())[:6]))
    lines.append(f"Version {card.get('version', '?')}, licence {card.get('licence', '?')}")
    return "\n".join(lines)


# ---- Python requirements ----------------------------------------------------------------------

# Distribution name -> import name, where they differ.
_IMPORT_NAMES = {"pynrrd": "nrrd", "SimpleITK": "SimpleITK", "scikit-image": "skimage", "pyyaml": "yaml"}


def readRequirements(path: str | os.PathLike) -> list[str]:
    """Requirement lines of a requirements.txt (comments, blank lines and pip options skipped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            out.append(line)
    return out


def _split(requirement: str) -> tuple[str, str]:
    m = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(.*)$", requirement)
    if not m:
        raise ValueError(f"cannot read requirement {requirement!r}")
    return m.group(1), m.group(2).split(";", 1)[0].strip()


def installedVersion(name: str) -> str | None:
    import importlib.metadata
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def isSatisfied(requirement: str) -> bool:
    """True if the distribution is installed in a version the requirement accepts."""
    name, spec = _split(requirement)
    version = installedVersion(name)
    if version is None:
        # Some Slicer builds bundle packages without metadata (e.g. SimpleITK): try the import name.
        return importlib.util.find_spec(_IMPORT_NAMES.get(name, name.replace("-", "_"))) is not None
    if not spec:
        return True
    try:
        from packaging.specifiers import SpecifierSet
        return SpecifierSet(spec).contains(version, prereleases=True)
    except ImportError:   # no `packaging`: presence is the best check we can do
        return True


def missingRequirements(requirements: list[str]) -> list[str]:
    return [r for r in requirements if not isSatisfied(r)]
