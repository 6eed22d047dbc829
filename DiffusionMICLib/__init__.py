"""DiffusionMICLib: diffusion models for medical image computing (no Slicer imports).

    import DiffusionMICLib as dmic
    vol = dmic.read_volume("t1.nii.gz")
    result = dmic.denoise(vol, "brain-mri-denoise")          # the card's 4 steps
    dmic.write_volume(result.outputs["output"], "t1-denoised.nrrd")
    dmic.finetune("denoise", "brain-mri-denoise", "my-site-data/", "models/site-denoise")   # LoRA
    dmic.adapt("denoise", "brain-mri-denoise", "t1.nii.gz", "models/t1-adapted")   # no reference needed
    atlas = dmic.TissueAtlas("brain-mri-lesion-segment", healthy)    # healthy: [[T1, T2, PD, FLAIR], ...]
    found = atlas.detect([t1, t2, pd, flair])                          # tissue out of place, any intensity

The names below are imported on first use (PEP 562), so that `import DiffusionMICLib` and
commands that need little (`diffusion-mic phantom`, `models list`) do not load the engine
(diffusers, MONAI networks) first.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "anomaly": "api", "denoise": "api", "detect_anomalies": "api", "evaluate": "api", "evaluate_many": "api",
    "generate": "api", "run": "api", "segment": "api", "translate": "api",
    "TissueAtlas": "atlas",
    "adapt": "engine.pipeline", "finetune": "engine.pipeline", "train": "engine.pipeline",
    "Cancelled": "errors", "DiffusionMICError": "errors",
    "ModelCard": "models", "load_model": "models",
    "Progress": "progress",
    "RunOptions": "tasks", "RunResult": "tasks",
    "Geometry": "volume", "Volume": "volume", "VolumeError": "volume", "read_volume": "volume",
    "write_volume": "volume",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
