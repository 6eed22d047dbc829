"""DiffusionMICLib: diffusion models for medical image computing (no Slicer imports).

    import DiffusionMICLib as dmic
    vol = dmic.read_volume("t1.nii.gz")
    result = dmic.denoise(vol, "brain-mri-denoise", steps=10)
    dmic.write_volume(result.outputs["output"], "t1-denoised.nrrd")
    dmic.finetune("denoise", "brain-mri-denoise", "my-site-data/", "models/site-denoise")   # LoRA
"""
from .api import (anomaly, denoise, detect_anomalies, evaluate, evaluate_many, generate, run, segment,
                  translate)
from .engine.pipeline import finetune, train
from .errors import Cancelled, DiffusionMICError
from .models import ModelCard, load_model
from .progress import Progress
from .tasks import RunOptions, RunResult
from .volume import Geometry, Volume, VolumeError, read_volume, write_volume

__all__ = ["Cancelled", "DiffusionMICError", "Geometry", "ModelCard", "Progress", "RunOptions", "RunResult",
           "Volume", "VolumeError", "anomaly", "denoise", "detect_anomalies", "evaluate", "evaluate_many", "finetune", "generate", "load_model", "read_volume", "run", "segment", "train", "translate", "write_volume"]
