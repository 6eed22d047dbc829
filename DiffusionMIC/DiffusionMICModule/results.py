"""A run's results into the MRML scene: node names, generated outputs' order, import, display."""
from __future__ import annotations

import json
import os

import numpy as np

import slicer

from . import mrml
from .backend import BackendError
from .compat import hasApp
from .jobs import DiffusionMICResult

ATTRIBUTE = "DiffusionMIC."


def generatedKeys(keys, card, info) -> list:
    """Generate's output keys in order, with (sample number, channel name) each.

    The library names them output, T2, 2, 2-T2, ...: sample 1 channel 1 is "output",
    later channels add their name, later samples their number (1-based).
    """
    channels = list(info.get("channels") or (card or {}).get("outputs") or ["image"])
    out = []
    for key in keys:
        sample, channel = 1, channels[0]
        if key != "output":
            first, _sep, rest = key.partition("-")
            if first.isdigit():
                sample, channel = int(first), rest or channels[0]
            else:
                channel = key
        if channel == "image" and info.get("condition"):   # modality-conditional: the class is the contrast
            channel = str(info["condition"])
        order = channels.index(channel) if channel in channels else len(channels)
        out.append((sample, order, key, channel))
    return [(key, sample, channel) for sample, order, key, channel in sorted(out)]

def outputName(task, inputNodes, card, model, key="output") -> str:
    """New nodes are named after their input and task: T1_denoised, T1_to_FLAIR, ..."""
    base = inputNodes[0].GetName() if inputNodes else ""
    if task == "generate":
        name = (card or {}).get("name") or os.path.basename(str(model).rstrip("/\\")) or "model"
        return f"{name}_generated" + (f"_{key}" if key != "output" else "")
    if task == "denoise":
        return f"{base}_denoised"
    if task == "translate":
        made = ((card or {}).get("outputs") or ["translated"])[0]
        return f"{base}_to_{made}"
    if task == "segment":
        return f"{base}_segmentation" if key == "output" else f"{base}_segmentation_{key}"
    if task == "anomaly":
        return f"{base}_anomaly_map" if key == "output" else f"{base}_anomaly_{key}"
    return f"{base}_{task}_{key}"

def importResults(task, model, card, inputNodes, outputNode, info, grid=None) -> DiffusionMICResult:
    """The backend's output files into the scene: read all first (a bad file changes nothing),
    then make the nodes, placed beside the first input; on any failure none is left. `grid`:
    the volume the backend read when the first input is not one (a segmentation's label map)."""
    outputs = info.get("outputs") or {}
    if "output" not in outputs:
        raise BackendError(f"the backend wrote no output ({', '.join(outputs) or 'nothing'})")
    reference = inputNodes[0] if inputNodes else None
    grid = grid if grid is not None else reference
    # 1. Read every file into nodes outside the scene: a bad file changes nothing.
    sources = {}
    for key, path in outputs.items():
        sources[key] = mrml.readVolume(path)
        if grid is not None:
            mrml.checkSameGrid(sources[key], grid, f"the {task} output '{key}'")
    # 2. Put them into the scene; on any failure remove what was made.
    staging = mrml.Staging()
    nodes = {}
    try:
        if task in ("denoise", "translate"):
            nodes["output"] = mrml.commitVolume(staging, sources["output"], outputName(task, inputNodes, card, model),
                                                outputNode, like=reference)
        elif task == "segment":
            labels = dict(info.get("labels") or (card or {}).get("labels") or {})
            nodes["output"] = mrml.commitSegmentation(staging, sources["output"],
                                                      outputName(task, inputNodes, card, model), reference,
                                                      labels, outputNode)
            if "uncertainty" in sources:
                nodes["uncertainty"] = mrml.commitVolume(
                    staging, sources["uncertainty"], outputName(task, inputNodes, card, model, "uncertainty"),
                    like=reference)
                mrml.setHeatDisplay(nodes["uncertainty"])
                nodes["output"].SetNodeReferenceID(ATTRIBUTE + "uncertainty", nodes["uncertainty"].GetID())
        elif task == "anomaly":
            nodes["output"] = mrml.commitVolume(staging, sources["output"], outputName(task, inputNodes, card, model),
                                                outputNode, like=reference)
            lower = info.get("threshold")   # the level the mask was made at
            if "mask" in sources:
                mapArray = slicer.util.arrayFromVolume(nodes["output"])
                maskArray = slicer.util.arrayFromVolume(sources["mask"]) > 0
                if lower is None and maskArray.any():
                    lower = float(mapArray[maskArray].min())
                nodes["mask"] = mrml.commitSegmentation(
                    staging, mrml.volumeFromArray(maskArray.astype(np.uint8), reference),
                    outputName(task, inputNodes, card, model, "mask"), reference,
                    {"anomaly": 1}, emptySegments=["anomaly"])
                nodes["output"].SetNodeReferenceID(ATTRIBUTE + "mask", nodes["mask"].GetID())
            mrml.setHeatDisplay(nodes["output"], lower)
            score = info.get("score", info.get("anomaly_score"))
            if score is not None:
                info["score"] = score
                nodes["output"].SetAttribute(ATTRIBUTE + "score", repr(score))
        else:   # generate: every output is a generated volume, on the model's own grid
            ordered = generatedKeys(list(sources), card, info)
            several = len({sample for _key, sample, _channel in ordered}) > 1
            manyChannels = len({channel for _key, _sample, channel in ordered}) > 1
            for i, (key, sample, channel) in enumerate(ordered):
                suffix = "_".join(([channel] if manyChannels or channel not in ("image",) else [])
                                  + ([str(sample)] if several else []))
                name = outputName(task, inputNodes, card, model) + (f"_{suffix}" if suffix else "")
                nodes[key] = mrml.commitVolume(staging, sources[key], name, outputNode if i == 0 else None,
                                               like=grid)      # from a label map: on its grid, under its transform
        for node in nodes.values():
            node.SetAttribute(ATTRIBUTE + "task", task)
            node.SetAttribute(ATTRIBUTE + "model", str(model))
            node.SetAttribute(ATTRIBUTE + "run", json.dumps({k: v for k, v in info.items() if k != "outputs"}))
            if reference is not None:
                node.SetNodeReferenceID(ATTRIBUTE + "input", reference.GetID())
            mrml.placeBeside(node, reference)
    except BaseException:
        staging.rollback()
        raise
    return DiffusionMICResult(task, nodes["output"], nodes, info, inputNodes)

def showResult(result) -> None:
    """Show a result in the slice views (works on any scene that has slice views)."""
    fit = hasApp()
    main = result.outputNode
    inputs = result.inputNodes
    if result.task == "anomaly" and inputs:
        slicer.util.setSliceViewerLayers(background=inputs[0], foreground=main, foregroundOpacity=0.5, fit=fit)
    elif result.task == "segment" and inputs:
        slicer.util.setSliceViewerLayers(background=inputs[0], fit=fit)
    elif main.IsA("vtkMRMLScalarVolumeNode"):
        slicer.util.setSliceViewerLayers(background=main, fit=fit)
