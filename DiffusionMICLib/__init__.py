"""DiffusionMICLib: diffusion models for medical image computing (no Slicer imports).

    import DiffusionMICLib as dmic
    vol = dmic.read_volume("t1.nii.gz")
    result = dmic.denoise(vol, "brain-mri-denoise", steps=10)
    dmic.write_volume(result.outputs["output"], "t1-denoised.nrrd")
"""
from .api import denoise, evaluate, run
from .errors import Cancelled, DiffusionMICError
from .models import ModelCard, load_model
from .progress import Progress
from .tasks import RunOptions, RunResult
from .volume import Geometry, Volume, VolumeError, read_volume, write_volume

__all__ = ["Cancelled", "DiffusionMICError", "Geometry", "ModelCard", "Progress", "RunOptions", "RunResult",
           "Volume", "VolumeError", "denoise", "evaluate", "load_model", "read_volume", "run", "write_volume"]
