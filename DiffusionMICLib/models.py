"""Model folders (model.json card + model.safetensors), the catalog, and loading with hash checks."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .engine.latent import build_model
from .engine.schedule import NoiseSchedule
from .errors import DiffusionMICError

CARD = "model.json"
WEIGHTS = "model.safetensors"
TASKS = ("generate", "translate", "segment", "denoise", "anomaly")
LABEL_INPUT = "labels"      # a card input that is a label map, not an image
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ModelCard:
    """Everything needed to run a model and to judge it (DESIGN.md, 'Models')."""

    name: str
    task: str
    inputs: list[str]                    # conditioning channels (modality names); [] if none
    outputs: list[str]                   # generated channels (modality names or 'labels')
    network: dict[str, Any]
    schedule: dict[str, Any]
    version: str = "0.1.0"
    description: str = ""
    orientation: str = "RAS"             # array axes of the model's grid; "acquired": the input's slices (engine.space)
    spacing: list[float] | None = None   # mm (x, y, z); None: the input's own spacing
    normalisation: dict[str, Any] = field(default_factory=lambda: {"method": "percentile", "percentile": 99.5})
    input_range: list[float] | None = None   # training inputs' 0.1-99.9th percentiles / the robust scale
    sampler: dict[str, Any] = field(default_factory=lambda: {"name": "dpm++2m", "steps": 10})
    defaults: dict[str, Any] = field(default_factory=dict)   # strength, ensemble, guidance, ...
    classes: list[str] = field(default_factory=list)         # class-conditional names
    labels: dict[str, int] = field(default_factory=dict)     # segmentation labels
    patch: list[int] | None = None       # training crop (2D slice crop or 3D patch)
    context: int = 0                     # 2D models: neighbouring slices each side added to the conditioning
    grid: dict[str, Any] | None = None   # generate: output size/spacing
    latent: dict[str, Any] | None = None   # latent diffusion: the autoencoder (engine/latent.py)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    licence: str = "Apache-2.0"
    sha256: str = ""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise DiffusionMICError(f"model card task {self.task!r} is not one of {', '.join(TASKS)}")
        if self.context and (self.context < 0 or self.spatial_dims != 2):
            raise DiffusionMICError(f"context (neighbouring slices) must be >= 0 and needs a 2D network, got {self.context}")

    @property
    def noise_schedule(self) -> NoiseSchedule:
        return NoiseSchedule.from_dict(self.schedule)

    @property
    def spatial_dims(self) -> int:
        return int(self.network["spatial_dims"])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelCard":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise DiffusionMICError(f"model card has unknown fields: {', '.join(sorted(unknown))}")
        return cls(**d)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_model(folder: Path, card: ModelCard, network: torch.nn.Module, *, half: bool = False) -> Path:
    """Write card + safetensors into `folder` atomically (a temporary folder renamed at the end)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        state = {k: (v.half() if half and v.is_floating_point() else v).contiguous().cpu()
                 for k, v in network.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        card.sha256 = sha256_file(tmp / WEIGHTS)
        (tmp / CARD).write_text(json.dumps(card.to_dict(), indent=2) + "\n", encoding="utf-8")
        if folder.exists():
            for extra in folder.iterdir():   # keep what else the folder holds (train.json, checkpoints)
                if extra.name not in (CARD, WEIGHTS) and not (tmp / extra.name).exists():
                    os.replace(extra, tmp / extra.name)
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def write_card(folder: Path, card: ModelCard) -> Path:
    """Rewrite a model folder's card in place (atomically); the weights are not touched."""
    path = Path(folder) / CARD
    tmp = path.with_name(f".{CARD}.tmp")
    tmp.write_text(json.dumps(card.to_dict(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_card(folder: Path) -> ModelCard:
    path = Path(folder) / CARD
    if not path.is_file():
        raise DiffusionMICError(f"'{folder}' is not a model folder: no {CARD}")
    try:
        return ModelCard.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TypeError) as e:
        raise DiffusionMICError(f"cannot read model card '{path}': {e}") from None


def load_model(model: str | Path, device: torch.device | str = "cpu") -> tuple[ModelCard, torch.nn.Module]:
    """Load a model folder or catalog name; the weights' SHA-256 must match the card."""
    folder = resolve_model(model)
    card = read_card(folder)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise DiffusionMICError(f"model '{folder}' has no {WEIGHTS}")
    digest = sha256_file(weights)
    if digest != card.sha256:
        raise DiffusionMICError(f"model '{folder}': weights SHA-256 {digest[:12]}… does not match the card's {card.sha256[:12]}…")
    network = build_model(card.network, card.latent)
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}
    network.load_state_dict(state)
    return card, network.to(device).eval()


# ---- catalog -------------------------------------------------------------------------------

def catalog_path() -> Path:
    """Resources/Models/catalog.json of this checkout, or $DIFFUSIONMIC_CATALOG."""
    return Path(os.environ.get("DIFFUSIONMIC_CATALOG", REPO_ROOT / "Resources" / "Models" / "catalog.json"))


def read_catalog() -> list[dict[str, Any]]:
    path = catalog_path()
    if not path.is_file():
        return []
    return json.loads(path.read_text(encoding="utf-8")).get("models", [])


def cache_dir() -> Path:
    """Where downloaded/imported models live ($DIFFUSIONMIC_CACHE, else ~/.cache/diffusionmic)."""
    return Path(os.environ.get("DIFFUSIONMIC_CACHE", Path.home() / ".cache" / "diffusionmic"))


def resolve_model(model: str | Path) -> Path:
    """A model folder path, a catalog name (bundled folder or cached download), or an imported name."""
    path = Path(model)
    if (path / CARD).is_file():
        return path
    for entry in read_catalog():
        if entry["name"] == str(model):
            if "path" in entry:
                return catalog_path().parent / entry["path"]
            cached = cache_dir() / entry["name"]
            if (cached / CARD).is_file():
                return cached
            raise DiffusionMICError(f"model {model!r} is not downloaded yet: run 'diffusion-mic models fetch {model}'")
    if path.name == str(model) and str(model) != ".." and (cache_dir() / path.name / CARD).is_file():
        return cache_dir() / path.name     # imported with 'diffusion-mic models import'
    raise DiffusionMICError(f"no model folder or catalog entry named '{model}'")
