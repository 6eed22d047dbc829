"""The Slicer module's Logic on real MRML (slicer-core): nodes in, nodes out, through the real
backend process (DiffusionMICLib's command line) and, for process-handling edge cases, a small
fake backend that follows the same command-line contract.

What needs Slicer's application (the Widget, the .ui loaded by Qt, PythonSlicer) is checked by
DiffusionMICTest inside Slicer; here the .ui file is checked against the parameter node and the
Widget's code statically.
"""
from __future__ import annotations

import json
import os
import re
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
import vtk  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "DiffusionMIC"
UI_FILE = REPO / "Resources" / "UI" / "DiffusionMIC.ui"
sys.path.insert(0, str(MODULE_DIR))
slicer.mrmlScene = slicer.vtkMRMLScene()   # the module imports slicer.mrmlScene-using helpers
import DiffusionMIC as module  # noqa: E402
from DiffusionMICModule import catalog, install, mrml, panels, views  # noqa: E402
from DiffusionMICModule.backend import BackendError, BackendProcess  # noqa: E402

TINY = {"network": {"channels": [16, 32], "attention_levels": [False, False], "norm_num_groups": 16},
        "patch": [48, 48], "train": {"batch_size": 4}}
TIMEOUT = 300


# ---- scene and volumes ----------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def scene():
    """A fresh MRML scene for every test (slicer.util and the Logic use slicer.mrmlScene)."""
    slicer.mrmlScene = slicer.vtkMRMLScene()
    yield slicer.mrmlScene


def oblique_matrix(spacing=(0.9, 1.3, 3.0), origin=(12.5, -20.25, 7.75), degrees=(12.0, -20.0, 7.0)):
    """IJKToRAS of an oblique, anisotropic grid."""
    ax, ay, az = np.radians(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    m = np.eye(4)
    m[:3, :3] = rz @ ry @ rx @ np.diag(spacing)
    m[:3, 3] = origin
    return m


def add_volume(array, name, matrix=None, folder="Study", className="vtkMRMLScalarVolumeNode"):
    """A volume node (oblique grid by default) inside a subject-hierarchy folder."""
    node = slicer.util.addVolumeFromArray(np.ascontiguousarray(array), oblique_matrix() if matrix is None else matrix,
                                          name=name, nodeClassName=className)
    if folder:
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        parent = sh.GetItemChildWithName(sh.GetSceneItemID(), folder) or sh.CreateFolderItem(sh.GetSceneItemID(), folder)
        item = sh.GetItemByDataNode(node) or sh.CreateItem(parent, node)
        sh.SetItemParent(item, parent)
    return node


def sh_parent(node):
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(node.GetScene())
    return sh.GetItemParent(sh.GetItemByDataNode(node))


def node_count():
    return slicer.mrmlScene.GetNumberOfNodes()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _group_members(pgid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                out.append(int(entry))
    return out


def poll_until(job, condition=lambda: False, timeout=TIMEOUT):
    """Poll a job as the GUI's timer does, until it is done or `condition()` holds."""
    deadline = time.monotonic() + timeout
    while not job.poll() and not condition():
        assert time.monotonic() < deadline, "the backend took too long"
        time.sleep(0.05)


# ---- data and models ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def phantom(tmp_path_factory):
    """One 2 mm phantom subject (nnU-Net layout) and its arrays (z, y, x)."""
    import SimpleITK as sitk
    from DiffusionMICLib.phantom import write_phantom
    out = tmp_path_factory.mktemp("slicer-phantom")
    write_phantom(out, subjects=1, seed=0, resolution=2.0, noise=5.0, lesions=3)
    read = lambda p: sitk.GetArrayFromImage(sitk.ReadImage(str(p)))  # noqa: E731
    arrays = {name: read(out / "imagesTr" / f"phantom_000_{i:04d}.nii.gz").astype(np.float32)
              for i, name in enumerate(("T1", "T2", "PD", "FLAIR"))}
    arrays["T1 clean"] = read(out / "cleanTr" / "phantom_000_0000.nii.gz").astype(np.float32)
    arrays["labels"] = read(out / "labelsTr" / "phantom_000.nii.gz").astype(np.uint8)
    return out, arrays


def crop(array):
    """A central slab: 6 slices of 40 x 40 voxels (small, so runs take seconds)."""
    z, y, x = (s // 2 for s in array.shape)
    return np.ascontiguousarray(array[z - 3:z + 3, y - 20:y + 20, x - 20:x + 20])


@pytest.fixture(scope="session")
def models(phantom, tmp_path_factory):
    """A tiny denoiser trained for 5 steps; the other tasks' models untrained (random weights)
    from the library's own cards, enough to exercise the command-line contract."""
    import torch
    from DiffusionMICLib.datasets import read_dataset
    from DiffusionMICLib.engine.network import build_network
    from DiffusionMICLib.engine.pipeline import train
    from DiffusionMICLib.models import save_model
    from DiffusionMICLib.tasks import TASKS

    data, _ = phantom
    root = tmp_path_factory.mktemp("slicer-models")
    out = {}
    train("denoise", data, root / "denoise", settings=json.loads(json.dumps(TINY)), max_steps=5, device="cpu")
    out["denoise"] = str(root / "denoise")
    dataset = read_dataset(data)
    extra = {"translate": {"task": {"inputs": ["T1", "T2"], "output": "FLAIR"}},
             "segment": {"task": {"inputs": ["T1", "FLAIR"]}},
             "anomaly": {"task": {"channels": ["FLAIR"]}},
             "generate": {"grid": {"size": [16, 16, 8], "spacing": [4.0, 4.0, 4.0], "origin": [30.0, 30.0, -10.0],
                                   "direction": [-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0]}},
             "generate-labels": {"task": {"from_labels": True, "channels": ["T1", "FLAIR"]}}}
    extra["generate-lesions"] = {**extra["generate"], "task": {"classes": "lesion", "lesion_map": True}}
    for task, settings in extra.items():
        card = TASKS[task.split("-")[0]].make_card(dataset, {**json.loads(json.dumps(TINY)), **settings})
        network = build_network(card.network)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():   # MONAI zero-initialises the output conv: give it non-zero outputs
            for p in network.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        if task == "generate-lesions":     # training lesion maps, as training keeps them: two made-up lesions
            from DiffusionMICLib.tasks import lesion_maps
            kept = np.zeros((1, *card.patch), np.float32)
            kept[0, 2:4, 4:7, 4:7], kept[0, 5, 9:11, 9:11] = 1.0, 0.5
            card.training["lesion_maps"] = lesion_maps.keep([kept])
        save_model(root / task, card, network)
        out[task] = str(root / task)
    return out


# ---- a fake backend for process-handling edge cases ------------------------------------------

FAKE_BACKEND = textwrap.dedent('''
    """Follows DiffusionMICLib's command-line contract; behaviour chosen by the model folder's name."""
    import argparse, json, os, subprocess, sys, time
    import numpy as np
    import SimpleITK as sitk

    def progress(stage, step, steps):
        print(json.dumps({"stage": stage, "step": step, "steps": steps, "fraction": step / steps}), flush=True)

    def main():
        p = argparse.ArgumentParser()
        p.add_argument("command"); p.add_argument("task")
        for flag in ("--model", "--output", "--uncertainty", "--mask", "--progress", "--steps", "--seed"):
            p.add_argument(flag)
        p.add_argument("--input", action="append", default=[])
        p.add_argument("--pred"); p.add_argument("--ref")
        a, _ = p.parse_known_args()
        if a.command == "evaluate":
            pred = sitk.GetArrayFromImage(sitk.ReadImage(a.pred))
            ref = sitk.GetArrayFromImage(sitk.ReadImage(a.ref))
            print("a library warning on stdout")
            print(json.dumps({"pred_values": sorted(int(v) for v in np.unique(pred)),
                              "ref_values": sorted(int(v) for v in np.unique(ref)),
                              "dice": {"CSF": 0.5, "GM": 0.25}, "voxels": int(pred.size), "note": "text"}, indent=2))
            return 0
        behaviour = os.path.basename(a.model.rstrip("/"))
        if behaviour == "fail":
            print("UserWarning: something harmless", file=sys.stderr)
            print("diffusion-mic: error: the fake model cannot run on this input", file=sys.stderr)
            return 2
        if behaviour == "slow":
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
            with open(os.path.join(a.model, "pids.json"), "w") as f:
                json.dump({"backend": os.getpid(), "child": child.pid}, f)
            for i in range(100000):
                progress(a.task, i, 100000)
                time.sleep(0.05)
        image = sitk.ReadImage(a.input[0])
        if behaviour == "offgrid":
            image.SetSpacing([s * 2 for s in image.GetSpacing()])
        sitk.WriteImage(image, a.output)
        progress(a.task, 1, 1)
        print(json.dumps({"outputs": {"output": a.output}, "seed": 0}))
        return 0

    sys.exit(main())
''')


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A Logic whose backend is the fake above (on PYTHONPATH), and a folder for fake models."""
    (tmp_path / "fake_diffusionmic.py").write_text(FAKE_BACKEND, encoding="utf-8")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    logic = module.DiffusionMICLogic()
    logic.backendModule = "fake_diffusionmic"
    for name in ("slow", "fail", "offgrid"):
        (tmp_path / name).mkdir()
    return logic, tmp_path


# ---- the module without Qt ------------------------------------------------------------------

def test_logic_imports_on_slicer_core_without_qt():
    assert module.HAVE_QT is False
    logic = module.DiffusionMICLogic()
    node = logic.getParameterNode()
    assert node.IsA("vtkMRMLScriptedModuleNode") and node.GetAttribute("ModuleName") == "DiffusionMIC"
    assert logic.getParameterNode() is node                     # a singleton, as in Slicer
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode") == 1
    for name in ("DiffusionMIC", "DiffusionMICWidget"):
        with pytest.raises(RuntimeError):                          # only Slicer makes these
            getattr(module, name)(None)


def test_parameter_defaults():
    """The wrapper needs Qt (not in slicer-core): check the plain declarations and defaults."""
    p = module.DiffusionMICParameterNode()
    assert p.device == "auto" and p.compareTask == "auto" and p.generateCount == 1
    for task in module.TASKS:
        sampling = getattr(p, task)
        assert (sampling.sampler, sampling.steps, sampling.seed, sampling.strength, sampling.ensemble,
                sampling.guidance) == ("dpm++2m", 10, 0, 1.0, 1, 1.0)
        assert getattr(p, f"{task}Model") == "" and getattr(p, f"{task}Output") is None
        assert getattr(p, f"{task}Inputs", []) == []
    assert p.segmentInputs is not p.denoiseInputs
    assert getattr(p, "generate") is not getattr(p, "denoise")    # one pack per panel
    assert catalog.FALLBACK_DEFAULTS == {k: getattr(p.denoise, k) for k in catalog.FALLBACK_DEFAULTS}


def _annotation_parts(annotation):
    from typing import get_args, get_origin, Annotated, Union
    if get_origin(annotation) is Annotated:
        base, *extras = get_args(annotation)
        return base, extras
    if get_origin(annotation) is Union:
        return annotation, []
    return annotation, []


def test_ui_file_matches_parameter_node_and_widget():
    """Every SlicerParameterName names a parameter of a type its widget can show; every widget the
    Widget code uses exists; every MRML widget gets the scene; names are unique."""
    from typing import Union, get_args, get_origin
    root = ET.parse(UI_FILE).getroot()
    widgets = {w.get("name"): w for w in root.iter("widget")}
    assert len(widgets) == len(list(root.iter("widget")))
    fields = module.DiffusionMICParameterNode.__annotations__
    pack = module.DiffusionMICSampling.__annotations__

    def prop(w, name):
        for p in w.findall("property"):
            if p.get("name") == name:
                return p
        return None

    bound = {}
    for name, w in widgets.items():
        p = prop(w, "SlicerParameterName")
        if p is None:
            continue
        assert p.get("stdset") == "0"
        param = p.find("string").text
        top, _, sub = param.partition(".")
        assert top in fields, f"{name}: no parameter {top}"
        annotation = pack[sub] if sub else fields[top]
        base, extras = _annotation_parts(annotation)
        cls = w.get("class")
        kinds = {type(e).__name__ for e in extras}
        if cls == "qMRMLNodeComboBox":
            types = [s.text for s in prop(w, "nodeTypes").find("stringlist")]
            wanted = [t.__name__ for t in (get_args(base) if get_origin(base) is Union else (base,))
                      if t is not type(None)]
            if get_origin(base) is Union:   # the wrapper needs None in a Union of node types
                assert type(None) in get_args(base), name
            assert sorted(types) == sorted(wanted), name
        elif cls == "QComboBox":
            assert base is str and "Choice" in kinds, name
        elif cls == "QSpinBox":
            assert base is int and "WithinRange" in kinds, name
        elif cls in ("ctkSliderWidget", "QDoubleSpinBox"):
            assert base is float and "WithinRange" in kinds, name
        elif cls == "QLineEdit":
            assert base is str, name
        elif cls == "ctkPathLineEdit":
            assert base is Path, name
        else:
            pytest.fail(f"{name}: {cls} is not a widget the parameter node wrapper connects")
        bound[param] = name
    for task in module.TASKS:
        for key in catalog.FALLBACK_DEFAULTS:
            assert f"{task}.{key}" in bound
        assert f"{task}Output" in bound
    connected = {c.find("receiver").text for c in root.iter("connection")
                 if c.find("signal").text == "mrmlSceneChanged(vtkMRMLScene*)"}
    mrml_widgets = {n for n, w in widgets.items()
                    if w.get("class") in ("qMRMLNodeComboBox", "qMRMLCheckableNodeComboBox", "qMRMLTableView")}
    assert mrml_widgets == connected
    # Every panel of the table has its widgets; the code uses no other suffix than these.
    suffixes = ("ApplyButton", "ModelComboBox", "ModelInfoLabel", "ProgressBar", "StatusLabel", "InputsWidget",
                "ScoreLabel", "ConditionComboBox", "MetricsButton", "LesionLoadSpinBox", "HealthyPathLineEdit")
    required = {f"{p.task}{s}" for p in panels.PANELS for s in suffixes[:5]}
    required |= {f"{p.task}InputsWidget" for p in panels.PANELS if p.takesInputs}
    required |= {f"{p.task}ScoreLabel" for p in panels.PANELS if p.showsScore}
    required |= {f"{p.task}ConditionComboBox" for p in panels.PANELS if "condition" in p.extraOptions}
    required |= {f"{p.task}LesionLoadSpinBox" for p in panels.PANELS if "lesionLoad" in p.extraOptions}
    required |= {f"{p.task}HealthyPathLineEdit" for p in panels.PANELS if "healthy" in p.extraOptions}
    required |= {"compareProgressBar", "compareStatusLabel", "compareMetricsButton"}
    source = "".join((MODULE_DIR / name).read_text(encoding="utf-8") for name in (
        "DiffusionMIC.py", "DiffusionMICModule/panelview.py", "DiffusionMICModule/text2imageview.py"))
    required |= set(re.findall(r"self\.ui\.(\w+)", source))
    assert set(re.findall(r'widget\((?:\w+, )?"(\w+)"', source)) <= set(suffixes)
    missing = sorted(n for n in required if n not in widgets)
    assert not missing, missing
    for p in panels.PANELS:   # the input selectors are built into a form layout, bound by hand
        if p.takesInputs:
            assert [c.get("class") for c in widgets[f"{p.task}InputsWidget"].findall("layout")] == ["QFormLayout"]
            assert get_origin(fields[f"{p.task}Inputs"]) is list
            wanted = ((Union[slicer.vtkMRMLScalarVolumeNode, slicer.vtkMRMLSegmentationNode, None],)
                      if p.task == "generate" else (slicer.vtkMRMLScalarVolumeNode,))     # generate: or a segmentation
            assert get_args(fields[f"{p.task}Inputs"]) == wanted
        for name in p.extraOptions:
            assert f"{p.task}{name[0].upper()}{name[1:]}" in fields
        assert {f"{p.task}Model", p.task, f"{p.task}Output"} <= set(fields)


def test_catalog_reader_agrees_with_library(tmp_path, monkeypatch, models):
    """The module reads the catalog without torch; it must agree with DiffusionMICLib.models."""
    from DiffusionMICLib import models as libmodels
    from DiffusionMICLib.cli import cmd_models
    cache = tmp_path / "cache"
    (cache / "cached-denoiser").mkdir(parents=True)
    (cache / "cached-denoiser" / "model.json").write_text(Path(models["denoise"], "model.json").read_text(encoding="utf-8"))
    entries = [{"name": "tiny-denoise", "task": "denoise", "description": "a tiny denoiser", "path": models["denoise"]},
               {"name": "cached-denoiser", "task": "denoise", "url": "https://example.org/x", "sha256": "0" * 64},
               {"name": "remote-segmenter", "task": "segment", "description": "not downloaded",
                "url": "https://example.org/y", "sha256": "0" * 64}]
    (tmp_path / "catalog.json").write_text(json.dumps({"models": entries}), encoding="utf-8")
    monkeypatch.setenv("DIFFUSIONMIC_CATALOG", str(tmp_path / "catalog.json"))
    monkeypatch.setenv("DIFFUSIONMIC_CACHE", str(cache))
    assert catalog.readCatalog() == libmodels.read_catalog() == entries
    listed = cmd_models(type("Args", (), {"action": "list", "name": None})())
    assert catalog.modelsForTask("denoise") == [e for e in listed if e["task"] == "denoise"]
    assert [e["name"] for e in module.DiffusionMICLogic.models("segment")] == ["remote-segmenter"]
    for name in ("tiny-denoise", "cached-denoiser", models["denoise"]):
        assert Path(catalog.resolveModel(name)).resolve() == Path(libmodels.resolve_model(name)).resolve()
    assert catalog.resolveModel("remote-segmenter") is None
    with pytest.raises(Exception):
        libmodels.resolve_model("remote-segmenter")
    assert catalog.readCard("tiny-denoise")["task"] == "denoise"
    assert catalog.cardTooltip(None, "a tiny denoiser") == "a tiny denoiser"
    assert "Conditional diffusion denoiser" in catalog.cardTooltip(catalog.readCard("tiny-denoise"))


def test_requirements_cover_the_library_dependencies():
    tomllib = pytest.importorskip("tomllib")
    declared = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    name = lambda r: re.match(r"[A-Za-z0-9._-]+", r).group(0).lower()  # noqa: E731
    listed = {name(r) for r in catalog.readRequirements(REPO / "Resources" / "requirements.txt")}
    assert {name(r) for r in declared} - {"torch"} <= listed
    assert "torch" not in listed    # PyTorch comes from the PyTorch extension
    assert module.DiffusionMICLogic().missingRequirements() == []
    assert catalog.missingRequirements(["surely-not-installed-pkg>=1"]) == ["surely-not-installed-pkg>=1"]


def test_card_defaults(models):
    logic = module.DiffusionMICLogic()
    card = json.loads(Path(models["denoise"], "model.json").read_text(encoding="utf-8"))
    assert logic.cardDefaults(models["denoise"]) == {**catalog.FALLBACK_DEFAULTS, "sampler": card["sampler"]["name"],
                                                     "steps": card["sampler"]["steps"]}
    if "anomaly" in models:
        anomaly = json.loads(Path(models["anomaly"], "model.json").read_text(encoding="utf-8"))
        assert logic.cardDefaults(models["anomaly"])["strength"] == anomaly["defaults"]["strength"]
    assert logic.cardDefaults("no-such-model") == catalog.FALLBACK_DEFAULTS


# ---- real backend: denoise ---------------------------------------------------------------------

def test_denoise_blocking_keeps_geometry_and_places_beside_input(phantom, models):
    _, arrays = phantom
    t1 = add_volume(crop(arrays["T1"]), "T1")
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "scanner")
    t1.SetAndObserveTransformNodeID(transform.GetID())
    before = slicer.util.arrayFromVolume(t1).copy()
    logic = module.DiffusionMICLogic()
    out = logic.denoise(t1, model=models["denoise"], steps=2)
    assert out.IsA("vtkMRMLScalarVolumeNode") and out is not t1 and out.GetScene() is slicer.mrmlScene
    assert out.GetName() == "T1_denoised"
    assert out.GetImageData().GetDimensions() == t1.GetImageData().GetDimensions()
    assert np.array_equal(mrml.ijkToRAS(out), mrml.ijkToRAS(t1))          # identical, not just close
    assert out.GetTransformNodeID() == transform.GetID()
    assert sh_parent(out) == sh_parent(t1) != 0                          # beside the input
    array = slicer.util.arrayFromVolume(out)
    assert np.isfinite(array).all() and array.dtype == np.float32 and not np.array_equal(array, before)
    assert abs(float(array.mean()) - float(before.mean())) < 0.5 * float(before.mean())   # input's units
    assert np.array_equal(slicer.util.arrayFromVolume(t1), before)     # input untouched
    assert out.GetAttribute("DiffusionMIC.task") == "denoise"
    assert out.GetNodeReference("DiffusionMIC.input") is t1
    assert json.loads(out.GetAttribute("DiffusionMIC.run"))["steps"] == 2
    assert logic.lastResult.outputNode is out


def test_denoise_adapted_to_the_scan_first(phantom, models):
    """The Denoise panel's "Adapt to the scan" (run --adapt): a temporary copy is adapted, the
    model folder is left as it was; other tasks refuse the option before anything starts."""
    _, arrays = phantom
    t1 = add_volume(crop(arrays["T1"]), "T1")
    weights = Path(models["denoise"], "model.safetensors").read_bytes()
    logic = module.DiffusionMICLogic()
    out = logic.denoise(t1, model=models["denoise"], steps=2, adapt=2)
    assert json.loads(out.GetAttribute("DiffusionMIC.run"))["adapted"]["steps"] == 2
    assert Path(models["denoise"], "model.safetensors").read_bytes() == weights
    nodes = slicer.mrmlScene.GetNumberOfNodes()
    with pytest.raises(ValueError, match="only denoise"):
        logic.segment([t1], model=models["denoise"], adapt=5)
    with pytest.raises(ValueError, match="only denoise takes the input's noise level"):
        logic.segment([t1], model=models["denoise"], sigma=5.0)
    assert slicer.mrmlScene.GetNumberOfNodes() == nodes


def test_failing_backend_leaves_no_node_and_says_why(phantom):
    _, arrays = phantom
    t1 = add_volume(crop(arrays["T1"]), "T1")
    count = node_count()
    job = module.DiffusionMICLogic().start("denoise", [t1], "no-such-model-xyz")
    with pytest.raises(BackendError) as raised:
        job.wait(timeout=TIMEOUT)
    assert str(raised.value) == "diffusion-mic: error: no model folder or catalog entry named 'no-such-model-xyz'"
    assert node_count() == count and job.state == "failed"
    assert not os.path.exists(job.tempDir)


def test_cancel_real_backend_leaves_scene_unchanged(phantom, models):
    _, arrays = phantom
    t1 = add_volume(crop(arrays["T1"]), "T1")
    count = node_count()
    finished = []
    job = module.DiffusionMICLogic().start("denoise", [t1], models["denoise"], steps=1000,
                                           onFinished=finished.append, onError=finished.append)
    time.sleep(1.0)
    assert job.poll() is False
    pid = job.process.pid
    job.cancel()                                           # returns at once; reaped in the background
    assert job.state == "cancelled" and not finished
    assert job.process.reaped.wait(30)
    assert not _alive(pid) and not _group_members(pid)
    assert node_count() == count and not os.path.exists(job.tempDir)
    with pytest.raises(module.DiffusionMICCancelled):
        job.wait()


def _rotated_transform(degrees=10.0, shift=(5.0, -3.0, 2.0)):
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "scanner")
    m = np.eye(4)
    a = np.radians(degrees)
    m[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    m[:3, 3] = shift
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, m[r, c])
    transform.SetMatrixTransformToParent(matrix)
    return transform, m


def test_four_input_segmentation_through_the_panel_under_a_transform(phantom, monkeypatch):
    """The bundled brain-mri-lesion-segment (T1, T2, PD, FLAIR): the Segment panel's selectors
    from its card, filled from the scene, run through the real backend; the Segmentation goes
    under the inputs' transform, aligned with them in world space."""
    _, arrays = phantom
    transform, m = _rotated_transform()
    nodes = {}
    for name in ("T1 clean", "T1", "T2", "PD", "FLAIR"):
        nodes[name] = add_volume(crop(arrays[name]), f"DiffusionMIC phantom {name}")
        nodes[name].SetAndObserveTransformNodeID(transform.GetID())
    logic = module.DiffusionMICLogic()
    slots = panels.inputSlots(panels.panel("segment"), logic.modelCard("brain-mri-lesion-segment"))
    volumes = [(n.GetName(), n) for n in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")]
    inputs = panels.matchInputs(slots, volumes)
    assert inputs == [nodes["T1"], nodes["T2"], nodes["PD"], nodes["FLAIR"]]
    read = {}
    original = mrml.readVolume
    monkeypatch.setattr(mrml, "readVolume", lambda path, *a, **k: read.setdefault(
        os.path.basename(path), original(path, *a, **k)))
    seg = logic.segment(inputs, model="brain-mri-lesion-segment", steps=1)
    assert seg.IsA("vtkMRMLSegmentationNode") and seg.GetTransformNodeID() == transform.GetID()
    assert set(mrml.segmentNames(seg)) <= {"CSF", "GM", "WM", "lesion"} and len(mrml.segmentNames(seg)) >= 3
    labels = slicer.util.arrayFromVolume(read["output.nrrd"]).astype(np.int16)
    t1 = nodes["T1"]
    assert np.array_equal(mrml.labelArrayFromSegmentation(seg, t1), labels)        # what Compare writes
    # World space: a reference grid without a transform, where the transformed T1 grid lies.
    hardened = add_volume(np.zeros_like(labels, dtype=np.uint8), "hardened", matrix=m @ mrml.ijkToRAS(t1),
                          className="vtkMRMLLabelMapVolumeNode")
    assert np.array_equal(mrml.labelArrayFromSegmentation(seg, hardened), labels)


# ---- fake backend: process handling --------------------------------------------------------

def test_cancel_kills_the_process_group(fake, phantom):
    logic, models = fake
    _, arrays = phantom
    t1 = add_volume(crop(arrays["T1"]), "T1")
    count = node_count()
    job = logic.start("denoise", [t1], str(models / "slow"))
    pids = models / "slow" / "pids.json"
    poll_until(job, lambda: job.fraction > 0 and pids.exists(), timeout=60)
    assert job.state == "running"
    ids = json.loads(pids.read_text(encoding="utf-8"))
    assert _alive(ids["backend"]) and _alive(ids["child"])
    job.cancel()
    assert job.process.reaped.wait(30)
    assert not _alive(ids["backend"]) and not _alive(ids["child"]) and not _group_members(job.process.pid)
    assert node_count() == count and job.state == "cancelled" and not os.path.exists(job.tempDir)


IGNORES_SIGTERM = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
                   "time.sleep(600)")


def _started(process):
    deadline = time.monotonic() + 60
    while "ready" not in process.stdoutLines:
        assert not process.poll() and time.monotonic() < deadline
        time.sleep(0.05)
    return process


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_cancel_does_not_block_and_kills_after_the_grace_period():
    process = _started(BackendProcess([sys.executable, "-c", IGNORES_SIGTERM]))
    before = time.monotonic()
    process.cancel(grace=60.0)
    assert time.monotonic() - before < 10                   # returns long before its 60 s grace
    assert _alive(process.pid) and not process.reaped.is_set()   # it ignores SIGTERM: still in its grace
    process.kill()                                          # what happens at exit; also ends the grace
    assert process.reaped.wait(30)
    assert not _alive(process.pid) and not _group_members(process.pid)
    short = _started(BackendProcess([sys.executable, "-c", IGNORES_SIGTERM]))
    short.cancel(grace=0.5)                                 # SIGTERM ignored: killed after the grace
    assert short.reaped.wait(30) and not _alive(short.pid) and not _group_members(short.pid)


def test_no_backend_process_outlives_the_interpreter():
    from DiffusionMICModule import backend
    process = _started(BackendProcess([sys.executable, "-c", IGNORES_SIGTERM]))
    assert process in backend._running
    backend._killLeftovers()                               # registered with atexit
    assert process.proc.wait(timeout=30) != 0 and process.poll()
    done = BackendProcess([sys.executable, "-c", "print('ready')"])
    done.wait(timeout=60)
    assert done not in backend._running


def test_backend_error_is_its_last_stderr_line(fake, phantom):
    logic, models = fake
    t1 = add_volume(crop(phantom[1]["T1"]), "T1")
    count = node_count()
    with pytest.raises(BackendError, match=r"^diffusion-mic: error: the fake model cannot run on this input$"):
        logic.denoise(t1, model=str(models / "fail"))
    assert node_count() == count


def test_output_off_the_input_grid_is_refused(fake, phantom):
    logic, models = fake
    t1 = add_volume(crop(phantom[1]["T1"]), "T1")
    count = node_count()
    with pytest.raises(mrml.SceneError, match="not on the input's voxel grid"):
        logic.denoise(t1, model=str(models / "offgrid"))
    assert node_count() == count


def test_bad_requests_fail_before_starting(phantom, models):
    t1 = add_volume(crop(phantom[1]["T1"]), "T1")
    seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    logic = module.DiffusionMICLogic()
    count = node_count()
    with pytest.raises(ValueError, match="unknown task"):
        logic.start("sharpen", [t1], models["denoise"])
    with pytest.raises(ValueError, match="choose a denoise model"):
        logic.start("denoise", [t1], "")
    with pytest.raises(ValueError, match="needs input"):
        logic.start("denoise", [], models["denoise"])
    with pytest.raises(ValueError, match="must be a vtkMRMLScalarVolumeNode"):
        logic.start("denoise", [t1], models["denoise"], outputNode=seg)
    with pytest.raises(ValueError, match="one of the inputs"):
        logic.start("denoise", [t1], models["denoise"], outputNode=t1)
    with pytest.raises(ValueError, match="sampler"):
        logic.start("denoise", [t1], models["denoise"], sampler="euler")
    with pytest.raises(ValueError, match="takes no input volume"):
        logic.start("generate", [t1], models["generate"])
    with pytest.raises(ValueError, match="from a label map"):
        logic.start("generate", [], models["generate-labels"])
    assert node_count() == count


# ---- real backend: all five panels running at once (non-blocking), as in the GUI -----------------

@pytest.fixture(scope="module")
def task_runs(phantom, models):
    """translate, segment, anomaly, generate and denoise (into an existing node) started together,
    then polled as the GUI's timer does."""
    from DiffusionMICLib.tasks import TASKS
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    for layout in ("Red", "Yellow"):   # slice views, as Slicer's layout makes them
        composite = slicer.vtkMRMLSliceCompositeNode()
        composite.SetLayoutName(layout)
        scene.AddNode(composite)
    _, arrays = phantom
    nodes = {name: add_volume(crop(arrays[name]), name) for name in ("T1", "T2", "FLAIR")}
    nodes["existing"] = add_volume(np.zeros((2, 3, 4), np.float32), "my output", matrix=np.diag([2.0, 2.0, 2.0, 1.0]))
    logic = module.DiffusionMICLogic()
    read = {}   # what the Logic read from the backend's files (removed afterwards), by output name
    original = mrml.readVolume

    def spy(path, *args, **kwargs):
        node = original(path, *args, **kwargs)
        read[str(path)] = slicer.util.arrayFromVolume(node).copy()
        return node
    requests = {"translate": ([nodes["T1"], nodes["T2"]], {}),
                "segment": ([nodes["T1"], nodes["FLAIR"]], {"ensemble": 2}),
                "anomaly": ([nodes["FLAIR"]], {}),
                "generate": ([], {"count": 2})}
    jobs, results = {}, {}
    for task, (inputs, options) in requests.items():
        if task in TASKS and task in models:
            jobs[task] = logic.start(task, inputs, models[task], steps=2, show=task == "anomaly",
                                     onFinished=lambda r, t=task: results.__setitem__(t, r), **options)
    count = node_count()
    progress, finished, failed = [], [], []
    jobs["denoise"] = logic.start("denoise", [nodes["T1"]], models["denoise"], outputNode=nodes["existing"], steps=3,
                                  seed=1, show=False, onProgress=lambda j: progress.append((j.fraction, j.status)),
                                  onFinished=finished.append, onError=failed.append)
    denoise = {"job": jobs["denoise"], "progress": progress, "finished": finished, "failed": failed,
               "started": os.path.isfile(os.path.join(jobs["denoise"].tempDir, "input0.nrrd")),
               "nodes while running": node_count() - count}
    deadline = time.monotonic() + TIMEOUT
    mrml.readVolume = spy
    try:
        while not all([job.poll() for job in list(jobs.values())]):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        mrml.readVolume = original
    errors = {t: j.error for t, j in jobs.items() if j.state != "finished" and t != "denoise"}
    return {"scene": scene, "nodes": nodes, "results": results, "errors": errors, "logic": logic, "read": read,
            "denoise": denoise}


def _task_result(task_runs, task):
    if task not in task_runs["results"] and task not in task_runs["errors"]:
        pytest.skip(f"the library has no {task} task yet")
    assert task not in task_runs["errors"], task_runs["errors"].get(task)
    slicer.mrmlScene = task_runs["scene"]
    return task_runs["results"][task]


def test_denoise_nonblocking_progress_into_existing_output(task_runs):
    slicer.mrmlScene = task_runs["scene"]
    run = task_runs["denoise"]
    job, t1, existing = run["job"], task_runs["nodes"]["T1"], task_runs["nodes"]["existing"]
    assert run["started"] and run["nodes while running"] == 0    # nothing in the scene while it runs
    assert job.state == "finished" and not run["failed"] and len(run["finished"]) == 1
    assert run["finished"][0].outputNode is existing           # no new node
    assert not slicer.util.getNodes("T1_denoised*")
    assert existing.GetImageData().GetDimensions() == t1.GetImageData().GetDimensions()
    assert np.array_equal(mrml.ijkToRAS(existing), mrml.ijkToRAS(t1))
    fractions = [f for f, _ in run["progress"]]
    assert fractions and fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert any("step" in status for _, status in run["progress"])
    assert not os.path.exists(job.tempDir)                       # the temporary folder is removed
    assert job.poll() is True and len(run["finished"]) == 1      # polling again does nothing


def test_translate_real_backend(task_runs):
    result = _task_result(task_runs, "translate")
    t1 = task_runs["nodes"]["T1"]
    out = result.outputNode
    assert out.GetName() == "T1_to_FLAIR" and out.IsA("vtkMRMLScalarVolumeNode")
    assert np.array_equal(mrml.ijkToRAS(out), mrml.ijkToRAS(t1))
    assert out.GetImageData().GetDimensions() == t1.GetImageData().GetDimensions()
    assert sh_parent(out) == sh_parent(t1)
    assert np.isfinite(slicer.util.arrayFromVolume(out)).all()


def test_segment_real_backend(task_runs, models):
    result = _task_result(task_runs, "segment")
    t1 = task_runs["nodes"]["T1"]
    seg = result.outputNode
    card = json.loads(Path(models["segment"], "model.json").read_text(encoding="utf-8"))
    names = {n for n, v in card["labels"].items() if v != 0}
    assert seg.IsA("vtkMRMLSegmentationNode") and seg.GetName() == "T1_segmentation"
    assert seg.GetDisplayNode() is not None
    got = mrml.segmentNames(seg)
    assert got and set(got) <= names                       # named from the card's labels
    segmentation = seg.GetSegmentation()
    for i in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(i)
        assert segment.GetColor() == pytest.approx(mrml.NAMED_COLOURS[segment.GetName().lower()])
        assert card["labels"][segment.GetName()] == mrml.segmentLabelValue(segment, i)
    # The segments hold exactly the backend's label map, on the input's grid.
    labels = task_runs["read"][result.info["outputs"]["output"]]
    assert np.array_equal(mrml.labelArrayFromSegmentation(seg, t1), labels.astype(np.int16))
    uncertainty = result.nodes["uncertainty"]
    assert uncertainty.GetName() == "T1_segmentation_uncertainty"
    assert np.array_equal(mrml.ijkToRAS(uncertainty), mrml.ijkToRAS(t1))
    assert seg.GetNodeReference("DiffusionMIC.uncertainty") is uncertainty
    assert sh_parent(seg) == sh_parent(uncertainty) == sh_parent(t1)
    # Compare the Segmentation node with a label map through the real `evaluate segment`.
    truth = add_volume(labels.astype(np.uint8), "truth", matrix=mrml.ijkToRAS(t1), className="vtkMRMLLabelMapVolumeNode")
    table = task_runs["logic"].compare(seg, truth)
    row = mrml.tableRows(table)[0]
    assert row["Task"] == "segment"
    for name in got:                                   # the labels' own values came back: Dice 1
        assert float(row[f"{name}/dice"]) == pytest.approx(1.0)
    assert float(row["mean_dice"]) == pytest.approx(1.0)


def test_anomaly_real_backend(task_runs):
    result = _task_result(task_runs, "anomaly")
    flair = task_runs["nodes"]["FLAIR"]
    amap = result.outputNode
    assert amap.GetName() == "FLAIR_anomaly_map"
    assert np.array_equal(mrml.ijkToRAS(amap), mrml.ijkToRAS(flair))
    mask = result.nodes["mask"]
    assert mask.IsA("vtkMRMLSegmentationNode") and mrml.segmentNames(mask) == ["anomaly"]
    assert amap.GetNodeReference("DiffusionMIC.mask") is mask
    score = result.info["score"]
    assert isinstance(score, float) and float(amap.GetAttribute("DiffusionMIC.score")) == score
    display = amap.GetDisplayNode()
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == pytest.approx(result.info["threshold"])
    for layout in ("Red", "Yellow"):                     # a coloured overlay on the input
        composite = views.sliceCompositeNode(layout)
        assert composite.GetBackgroundVolumeID() == flair.GetID()
        assert composite.GetForegroundVolumeID() == amap.GetID() and composite.GetForegroundOpacity() == 0.5
    expected = task_runs["read"][result.info["outputs"]["mask"]] > 0
    assert np.array_equal(mrml.labelArrayFromSegmentation(mask, flair) > 0, expected)


def test_anomaly_against_healthy_subjects(phantom, tmp_path):
    """logic.anomaly(..., healthy=FOLDER) runs `run anomaly --healthy` with the bundled segmenter:
    the map marks the subject's lesions; other tasks and a missing folder are refused first."""
    from DiffusionMICLib.phantom import make_subject
    from DiffusionMICLib.volume import Geometry, Volume, write_volume
    _, arrays = phantom
    z = int(np.argmax((arrays["labels"] >= 4).sum(axis=(1, 2))))
    slab = slice(max(0, z - 10), z + 10)                 # 20 slices around the most lesioned one
    names = ("T1", "T2", "PD", "FLAIR")
    matrix = np.diag([-2.0, -2.0, 2.0, 1.0])             # RAS of an LPS-identity 2 mm grid at the origin
    nodes = [add_volume(arrays[n][slab], n, matrix=matrix) for n in names]
    healthy = tmp_path / "healthy"
    (healthy / "imagesTr").mkdir(parents=True)
    (healthy / "dataset.json").write_text(json.dumps({
        "channel_names": {str(i): n for i, n in enumerate(names)}, "labels": {"background": 0},
        "numTraining": 1, "file_ending": ".nii.gz"}), encoding="utf-8")
    subject = make_subject(5, lesions=0)
    for i, n in enumerate(names):
        a = subject.images[n].array[slab]
        grid = Geometry(a.shape[::-1], (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
        write_volume(Volume(a, grid), healthy / "imagesTr" / f"h_{i:04d}.nii.gz")
    logic = module.DiffusionMICLogic()
    count = node_count()
    with pytest.raises(ValueError, match="only anomaly takes a healthy cohort"):
        logic.segment(nodes, model="brain-mri-lesion-segment", healthy=str(healthy))
    with pytest.raises(ValueError, match="is not a folder"):
        logic.anomaly(nodes, model="brain-mri-lesion-segment", healthy=str(tmp_path / "none"))
    assert node_count() == count
    amap = logic.anomaly(nodes, model="brain-mri-lesion-segment", healthy=str(healthy))
    info = logic.lastResult.info
    assert info["healthy_subjects"] == 1 and amap.GetNodeReference("DiffusionMIC.mask") is not None
    values, lesion = slicer.util.arrayFromVolume(amap), arrays["labels"][slab] >= 4
    inside = values > 0
    assert values[lesion].mean() > 3 * values[inside & ~lesion].mean()


def test_generate_real_backend(task_runs, models):
    result = _task_result(task_runs, "generate")
    generated = list(result.nodes.values())
    assert len(generated) == 2 and result.outputNode is generated[0]
    card = json.loads(Path(models["generate"], "model.json").read_text(encoding="utf-8"))
    assert [n.GetName() for n in generated] == [f"{card['name']}_generated_T1_1", f"{card['name']}_generated_T1_2"]
    from DiffusionMICLib.volume import Geometry
    grid = Geometry.from_dict(card["grid"])
    for node in generated:
        assert node.GetImageData().GetDimensions() == tuple(grid.size)
        np.testing.assert_allclose(mrml.ijkToRAS(node), grid.ras_affine(), atol=1e-6)
        assert sh_parent(node) == slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(
            slicer.mrmlScene).GetSceneItemID()


def test_generate_from_a_label_map_on_its_grid(phantom, models):
    """A model trained from label maps draws T1 and FLAIR on the label map's own (oblique) grid."""
    labels = add_volume(crop(phantom[1]["labels"]), "labels", className="vtkMRMLLabelMapVolumeNode")
    nodes = module.DiffusionMICLogic().generate(models["generate-labels"], labelNode=labels, steps=1)
    assert len(nodes) == 2
    for node in nodes:
        assert node.GetImageData().GetDimensions() == labels.GetImageData().GetDimensions()
        np.testing.assert_allclose(mrml.ijkToRAS(node), mrml.ijkToRAS(labels), atol=1e-6)


def test_generate_with_a_drawn_lesion_mask(models):
    """A lesion-map model takes a Segmentation drawn in Slicer (any segment name) as its lesion
    mask with the condition 'lesion'; with another condition it is one line and makes no node."""
    from DiffusionMICLib.volume import Geometry
    card = module.DiffusionMICLogic.modelCard(models["generate-lesions"])
    grid = Geometry.from_dict(card["grid"])
    drawn = np.zeros(grid.size[::-1], np.uint8)
    drawn[3:6, 6:10, 6:10] = 1
    source = add_volume(drawn, "lesions", matrix=grid.ras_affine(), className="vtkMRMLLabelMapVolumeNode")
    seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn lesions")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(source)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(source, seg)
    seg.GetSegmentation().GetNthSegment(0).SetName("Segment_1")
    logic = module.DiffusionMICLogic()
    count = node_count()
    with pytest.raises(ValueError, match="with the condition 'lesion'"):
        logic.generate(models["generate-lesions"], labelNode=seg, condition="healthy", steps=1)
    assert node_count() == count
    nodes = logic.generate(models["generate-lesions"], labelNode=seg, condition="lesion", steps=1)
    assert len(nodes) == 1 and nodes[0].GetImageData().GetDimensions() == tuple(grid.size)
    load = logic.lastResult.info["lesion_load_ml"][0]
    assert abs(load - drawn.sum() * np.prod(grid.spacing) / 1000) < 0.3 * load


def test_generate_a_lesion_load(models):
    """lesionLoad (the Generate panel's "Lesion load (mL)") reaches the backend: the drawn map holds
    about that load; a model without a lesion map refuses it in one line and makes no node."""
    from DiffusionMICLib.models import read_card
    from DiffusionMICLib.tasks import lesion_maps
    card = read_card(models["generate-lesions"])
    ask = max(lesion_maps.load_ml(card, k) for k in lesion_maps.kept(card))
    logic = module.DiffusionMICLogic()
    count = node_count()
    with pytest.raises(ValueError, match="lesion load"):
        logic.generate(models["generate"], condition="lesion", lesionLoad=ask, steps=1)
    assert node_count() == count
    nodes = logic.generate(models["generate-lesions"], condition="lesion", lesionLoad=ask, steps=1)
    assert len(nodes) == 1
    assert abs(logic.lastResult.info["lesion_load_ml"][0] - ask) <= lesion_maps.LOAD_TOLERANCE * ask


def test_generate_from_a_segmentation_by_segment_names(phantom, models):
    """A Segmentation drawn in Slicer (segments named as the card's labels, any case, any stored
    label value) is drawn as the label map it stands for, on its reference geometry; an
    unknown segment name is one line and makes no node."""
    labels = crop(phantom[1]["labels"])
    card = module.DiffusionMICLogic.modelCard(models["generate-labels"])
    values = {n: int(v) for n, v in card["labels"].items() if int(v)}
    shuffled = np.zeros_like(labels)                   # stored values that do not match the card's
    order = sorted(values.values())
    for old, new in zip(order, order[::-1]):
        shuffled[labels == old] = new
    source = add_volume(shuffled, "drawn", className="vtkMRMLLabelMapVolumeNode")
    seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn segmentation")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(source)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(source, seg)
    segmentation = seg.GetSegmentation()
    nameOf = {new: name for name, old in values.items() for o, new in zip(order, order[::-1]) if o == old}
    for i in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(i)
        name = nameOf[int(segment.GetLabelValue())]
        segment.SetName(name.lower() if i == 0 else name)
    converted = mrml.labelVolumeFromSegmentation(seg, card["labels"])
    assert converted.GetScene() is None
    assert np.array_equal(slicer.util.arrayFromVolume(converted), labels)      # the card's values, by name
    np.testing.assert_allclose(mrml.ijkToRAS(converted), mrml.ijkToRAS(source), atol=1e-6)

    count = node_count()
    nodes = module.DiffusionMICLogic().generate(models["generate-labels"], labelNode=seg, steps=1)
    assert len(nodes) == 2 and node_count() == count + 2 * len(nodes)      # each volume and its display node
    for node in nodes:
        assert node.GetImageData().GetDimensions() == source.GetImageData().GetDimensions()
        np.testing.assert_allclose(mrml.ijkToRAS(node), mrml.ijkToRAS(source), atol=1e-6)

    segmentation.GetNthSegment(1).SetName("tumour")
    count = node_count()
    with pytest.raises(ValueError, match="segment 'tumour' of 'drawn segmentation' is not a label this model knows"):
        module.DiffusionMICLogic().start("generate", [seg], models["generate-labels"])
    assert node_count() == count

    segmentation.GetNthSegment(1).SetName(nameOf[int(segmentation.GetNthSegment(1).GetLabelValue())])
    segmentation.SetConversionParameter(slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(), "")
    count = node_count()
    with pytest.raises(ValueError, match="segmentation 'drawn segmentation' has no reference geometry"):
        module.DiffusionMICLogic().start("generate", [seg], models["generate-labels"])
    assert node_count() == count


# ---- compare ---------------------------------------------------------------------------------

def test_compare_real_metrics_into_table(phantom, tmp_path):
    from DiffusionMICLib.metrics import image_metrics
    from DiffusionMICLib.volume import read_volume
    _, arrays = phantom
    noisy = add_volume(crop(arrays["T1"]), "T1")
    clean = add_volume(crop(arrays["T1 clean"]), "T1 clean")
    mask = add_volume((crop(arrays["labels"]) > 0).astype(np.uint8), "brain", className="vtkMRMLLabelMapVolumeNode")
    table = module.DiffusionMICLogic().compare(noisy, clean, task="denoise", maskNode=mask)
    assert table.IsA("vtkMRMLTableNode") and table.GetName() == "T1_vs_T1 clean_metrics"
    rows = mrml.tableRows(table)
    assert len(rows) == 1 and rows[0]["Result"] == "T1" and rows[0]["Reference"] == "T1 clean"
    assert rows[0]["Mask"] == "brain" and rows[0]["Task"] == "denoise"
    # The same numbers as the library computes on the same voxels (written by MRML, read by SimpleITK).
    files = {name: mrml.writeVolume(node, str(tmp_path / f"{name}.nrrd"))
             for name, node in (("pred", noisy), ("ref", clean), ("mask", mask))}
    expected = image_metrics(read_volume(files["pred"]), read_volume(files["ref"]), read_volume(files["mask"]))
    for key, value in expected.items():
        assert float(rows[0][key]) == pytest.approx(value, rel=1e-5), key
    assert sh_parent(table) == sh_parent(noisy)


def test_compare_segmentation_keeps_label_values_and_appends_rows(fake, phantom):
    logic, _ = fake
    _, arrays = phantom
    labels = crop(arrays["labels"])
    t1 = add_volume(crop(arrays["T1"]), "T1")
    reference = add_volume(labels, "truth", className="vtkMRMLLabelMapVolumeNode")
    staging = mrml.Staging()
    seg = mrml.commitSegmentation(staging, mrml.volumeFromArray(labels, t1), "T1_segmentation", t1,
                                  {"background": 0, "CSF": 1, "GM": 2, "WM": 3, "lesion": 4})
    seg.SetAttribute("DiffusionMIC.task", "segment")
    seg.SetNodeReferenceID("DiffusionMIC.input", t1.GetID())
    table = logic.compare(seg, reference)
    values = sorted(int(v) for v in np.unique(labels))
    row = mrml.tableRows(table)[0]
    assert row["Task"] == "segment" and float(row["dice/CSF"]) == 0.5 and float(row["dice/GM"]) == 0.25
    assert "note" not in row and "pred_values" not in row      # lists and text are not table cells
    assert logic.lastResult.info["pred_values"] == values == logic.lastResult.info["ref_values"]
    # A segmentation as reference: values follow the result's segment names.
    again = logic.compare(seg, seg, tableNode=table, inputNode=t1)
    assert again is table and table.GetNumberOfRows() == 2
    assert logic.lastResult.info["ref_values"] == values


def _slice_views(scene):
    """A layout node and Red/Yellow/Green slice views, as Slicer's application makes them."""
    layout = slicer.vtkMRMLLayoutNode()
    scene.AddNode(layout)
    layout.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView)
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    for name, orientation in (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal")):
        slice_node = scene.CreateNodeByClass("vtkMRMLSliceNode")
        slice_node.UnRegister(None)
        slice_node.SetLayoutName(name)
        slice_node.SetOrientation(orientation)
        scene.AddNode(slice_node)
        composite = slicer.vtkMRMLSliceCompositeNode()
        composite.SetLayoutName(name)
        scene.AddNode(composite)
    return layout


def test_side_by_side_links_the_views(phantom):
    layout = _slice_views(slicer.mrmlScene)
    _, arrays = phantom
    t1 = add_volume(crop(arrays["T1"]), "T1")
    result = add_volume(crop(arrays["T1 clean"]), "T1_denoised")
    logic = module.DiffusionMICLogic()
    logic.showSideBySide(t1, result)
    assert layout.GetViewArrangement() == slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView
    red, yellow = views.sliceCompositeNode("Red"), views.sliceCompositeNode("Yellow")
    assert red.GetBackgroundVolumeID() == t1.GetID() and yellow.GetBackgroundVolumeID() == result.GetID()
    assert red.GetLinkedControl() and yellow.GetLinkedControl() and red.GetHotLinkedControl()
    assert views.sliceNode("Yellow").GetOrientation() == "Axial"
    # A segmentation result: drawn over the input in the right view only.
    seg = mrml.commitSegmentation(mrml.Staging(), mrml.volumeFromArray(crop(arrays["labels"]), t1), "seg", t1,
                                  {"CSF": 1, "GM": 2, "WM": 3})
    logic.showSideBySide(t1, seg)
    assert yellow.GetBackgroundVolumeID() == t1.GetID()
    assert views.viewNodeIDs(seg.GetDisplayNode()) == [views.sliceNode("Yellow").GetID()]


def test_side_by_side_restores_segmentation_views_when_the_layout_changes(phantom):
    layout = _slice_views(slicer.mrmlScene)
    _, arrays = phantom
    t1 = add_volume(crop(arrays["T1"]), "T1")
    seg = mrml.commitSegmentation(mrml.Staging(), mrml.volumeFromArray(crop(arrays["labels"]), t1), "seg", t1,
                                  {"CSF": 1, "GM": 2, "WM": 3})
    mask = mrml.commitSegmentation(mrml.Staging(), mrml.volumeFromArray((crop(arrays["labels"]) == 3).astype(np.uint8), t1), "mask", t1,
                                   {"WM": 1})
    green = views.sliceNode("Green").GetID()
    mask.GetDisplayNode().AddViewNodeID(green)            # the user's own choice: Green view only
    logic = module.DiffusionMICLogic()
    logic.showSideBySide(t1, seg)
    logic.showSideBySide(t1, mask)
    yellow = [views.sliceNode("Yellow").GetID()]
    assert views.viewNodeIDs(seg.GetDisplayNode()) == yellow == views.viewNodeIDs(mask.GetDisplayNode())
    layout.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)   # still side by side
    assert views.viewNodeIDs(seg.GetDisplayNode()) == yellow
    layout.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView)       # the user leaves it
    assert views.viewNodeIDs(seg.GetDisplayNode()) == []          # all views again (Red and Green too)
    assert views.viewNodeIDs(mask.GetDisplayNode()) == [green]    # as the user had it
    assert not seg.GetDisplayNode().GetAttribute(views.SAVED_VIEWS)
    # Side by side again, then back: restored once more (the observer is set up again).
    logic.showSideBySide(t1, seg)
    layout.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutConventionalView)
    assert views.viewNodeIDs(seg.GetDisplayNode()) == []


# ---- sample data -------------------------------------------------------------------------------

def test_sample_phantom_loads_from_the_logic():
    nodes = module.DiffusionMICLogic().loadSamplePhantom(seed=3)
    names = [n.GetName() for n in nodes]
    assert names == ["DiffusionMIC phantom T1", "DiffusionMIC phantom T2", "DiffusionMIC phantom PD",
                     "DiffusionMIC phantom FLAIR", "DiffusionMIC phantom T1 clean", "DiffusionMIC phantom labels"]
    assert nodes[-1].IsA("vtkMRMLLabelMapVolumeNode")
    assert set(np.unique(slicer.util.arrayFromVolume(nodes[-1]))) <= {0, 1, 2, 3, 4}
    t1 = nodes[0]
    assert t1.GetImageData().GetDimensions() == (88, 104, 96)    # 2 mm MNI box (x, y, z)
    for node in nodes[1:]:
        assert np.array_equal(mrml.ijkToRAS(node), mrml.ijkToRAS(t1))
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    assert {sh_parent(n) for n in nodes} == {sh.GetItemChildWithName(sh.GetSceneItemID(), "DiffusionMIC brain phantom")}
    assert json.loads(t1.GetAttribute("DiffusionMIC.phantom")) == {"seed": 3, "case": "phantom_000"}
    # The Segment panel fills the bundled model's four inputs from these names.
    slots = panels.inputSlots(panels.panel("segment"), catalog.readCard("brain-mri-lesion-segment"))
    assert panels.matchInputs(slots, [(n.GetName(), n) for n in nodes]) == nodes[:4]


def test_dependencies_are_checked_before_any_backend_call(monkeypatch, tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("numpy>=1\nsurely-not-installed-pkg>=1\n", encoding="utf-8")
    monkeypatch.setattr(install.catalog, "resourcePath", lambda name="": str(tmp_path / name))
    started = []
    monkeypatch.setattr(module.DiffusionMICLogic, "_tempDir", lambda self: started.append(1))
    count = node_count()
    with pytest.raises(module.DependencyError, match="surely-not-installed-pkg>=1"):
        module.DiffusionMICLogic().loadSamplePhantom()
    assert not started and node_count() == count                 # nothing started, nothing made


def test_torch_version_is_checked_and_passed_to_pytorchutils(monkeypatch):
    tomllib = pytest.importorskip("tomllib")
    declared = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    assert "torch" + install.TORCH_REQUIREMENT in declared        # one range: the library's own
    assert install.torchInstalled() and module.DiffusionMICLogic.torchInstalled()
    monkeypatch.setattr(install, "TORCH_REQUIREMENT", ">=99")    # an installed torch that is too old
    assert not install.torchInstalled()
    assert install.missingDependencies() == ["torch>=99"]
    with pytest.raises(module.DependencyError, match="torch>=99"):
        module.DiffusionMICLogic().ensureDependencies()
    # In Slicer: PyTorchUtils gets the range (SlicerPyTorch's installTorch(askConfirmation,
    # forceComputationBackend, torchVersionRequirement, ...)); here it is a recorder.
    calls, shown = [], []

    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,
                         torchvisionVersionRequirement=None):
            calls.append((askConfirmation, torchVersionRequirement))
            return None                                             # the user declined

    monkeypatch.setitem(sys.modules, "PyTorchUtils", type(sys)("PyTorchUtils"))
    sys.modules["PyTorchUtils"].PyTorchUtilsLogic = PyTorchUtilsLogic
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kw: shown.append(text), raising=False)
    assert install.ensureDependencies() is False
    assert calls == [(True, ">=99")] and shown == ["DiffusionMIC cannot run without PyTorch."]


# ---- the self-test -------------------------------------------------------------------------------

def test_self_test_is_defined_and_skips_without_dependencies(monkeypatch):
    """DiffusionMICTest runs inside Slicer; here: what it exercises, and its skip without torch/MONAI."""
    import unittest
    source = (MODULE_DIR / "DiffusionMICModule" / "selftest.py").read_text(encoding="utf-8")
    for call in ("loadSamplePhantom", "denoise(", "compare(", "showSideBySide", "segment(", "translate(", "anomaly(",
                 "generate(", "cancel()", "inputSlots("):
        assert call in source, call
    assert module.selftest.skipReason() is None
    monkeypatch.setattr(install, "missingDependencies", lambda: ["torch>=2.2,<2.14", "monai>=1.4"])
    reason = module.selftest.skipReason()
    assert "torch>=2.2,<2.14, monai>=1.4" in reason
    result = unittest.TestResult()
    unittest.defaultTestLoader.loadTestsFromTestCase(module.DiffusionMICTest).run(result)
    assert result.testsRun == 1 and not result.errors and not result.failures
    assert [r for _, r in result.skipped] == [reason]
