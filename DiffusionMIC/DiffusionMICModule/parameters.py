"""The module's parameter node (parameterNodeWrapper): every panel's choices, saved with the scene."""

from pathlib import Path
from typing import Annotated, Union

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode

from .catalog import SAMPLERS
from .compat import Choice, WithinRange, parameterNodeWrapper, parameterPack
from .panels import TASKS
from .text2imagepanel import FINETUNE_KINDS, FINETUNE_SOURCES, METHODS

DEVICES = ["auto", "cpu", "cuda", "mps"]


@parameterPack
class DiffusionMICSampling:
    """Sampling parameters of one panel; a model's card sets them when the model is chosen."""

    sampler: Annotated[str, Choice(SAMPLERS)] = "dpm++2m"
    steps: Annotated[int, WithinRange(1, 1000)] = 10
    seed: Annotated[int, WithinRange(0, 2147483647)] = 0
    strength: Annotated[float, WithinRange(0.0, 1.0)] = 1.0
    ensemble: Annotated[int, WithinRange(1, 50)] = 1
    guidance: Annotated[float, WithinRange(0.0, 30.0)] = 1.0


@parameterNodeWrapper
class DiffusionMICParameterNode:
    """All choices of the module's panels.

    Per panel (panels.PANELS): <task>Model is a catalog name or model folder; <task>Inputs one
    volume per input the model's card names (the Widget builds a selector for each); <task>
    holds the sampling parameters; an empty <task>Output (None) means "create a new node".
    """

    device: Annotated[str, Choice(DEVICES)] = "auto"

    generateModel: str = ""
    # the label map (a volume or a segmentation), for models trained from label maps
    generateInputs: list[Union[vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, None]]
    generateCount: Annotated[int, WithinRange(1, 16)] = 1
    generateCondition: str = ""
    generateLesionLoad: Annotated[float, WithinRange(0.0, 500.0)] = 0.0    # mL, lesion-map models; 0: off
    generate: DiffusionMICSampling
    generateOutput: vtkMRMLScalarVolumeNode

    translateModel: str = ""
    translateInputs: list[vtkMRMLScalarVolumeNode]
    translate: DiffusionMICSampling
    translateOutput: vtkMRMLScalarVolumeNode

    segmentModel: str = ""
    segmentInputs: list[vtkMRMLScalarVolumeNode]
    segment: DiffusionMICSampling
    segmentOutput: vtkMRMLSegmentationNode

    denoiseModel: str = ""
    denoiseInputs: list[vtkMRMLScalarVolumeNode]
    denoise: DiffusionMICSampling
    denoiseOutput: vtkMRMLScalarVolumeNode
    denoiseAdapt: Annotated[int, WithinRange(0, 5000)] = 0     # self-supervised steps on the scan first; 0: off

    anomalyModel: str = ""
    anomalyInputs: list[vtkMRMLScalarVolumeNode]
    anomaly: DiffusionMICSampling
    anomalyOutput: vtkMRMLScalarVolumeNode
    anomalyHealthy: Path      # a segmenter's healthy cohort (tissue atlas): a data set folder; "." none

    compareInput: vtkMRMLScalarVolumeNode
    compareResult: Union[vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, None]
    compareReference: Union[vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, None]
    compareMask: vtkMRMLScalarVolumeNode
    compareTask: Annotated[str, Choice(["auto", *TASKS])] = "auto"
    compareTable: vtkMRMLTableNode

    # Fine-tune (text2imagepanel.py): a text-to-image base or a task model, on a folder or on
    # scene volumes (text-to-image only); the new model is <fineTuneName> in the models' folder.
    fineTuneKind: Annotated[str, Choice(list(FINETUNE_KINDS))] = "text2image"
    fineTuneBase: str = ""
    fineTuneMethod: Annotated[str, Choice(list(METHODS))] = "lora"
    fineTuneSource: Annotated[str, Choice(list(FINETUNE_SOURCES))] = "folder"
    fineTuneData: Path
    fineTuneVolumes: list[vtkMRMLScalarVolumeNode]
    fineTuneCaption: str = ""
    fineTuneToken: str = ""
    fineTuneName: str = ""
    fineTuneMaxSteps: Annotated[int, WithinRange(1, 100000)] = 400
    fineTuneRank: Annotated[int, WithinRange(0, 256)] = 4
    fineTunePriorImages: Annotated[int, WithinRange(0, 10000)] = 0

    # Text to image: a base (or DreamBooth folder), an adapter trained on it, a prompt.
    text2imageBase: str = ""
    text2imageAdapter: str = ""
    text2imagePrompt: str = ""
    text2imageCount: Annotated[int, WithinRange(1, 16)] = 1
    text2imageSeed: Annotated[int, WithinRange(0, 2147483647)] = 0
    text2imageSteps: Annotated[int, WithinRange(1, 1000)] = 20
    text2imageGuidance: Annotated[float, WithinRange(0.0, 30.0)] = 3.0
