"""The Fine-tune and Text-to-image panels (DiffusionMICModule/text2imagepanel.py) on real MRML
(slicer-core): what they send to the Logic for given parameter values, and their runs through the
real backend process on a tiny text-to-image base built here."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

slicer = pytest.importorskip("slicer")

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "DiffusionMIC"))
slicer.mrmlScene = slicer.vtkMRMLScene()
from DiffusionMICModule import catalog  # noqa: E402
from DiffusionMICModule import text2imagepanel as tp  # noqa: E402
from DiffusionMICModule.backend import BackendError  # noqa: E402
from DiffusionMICModule.logic import DiffusionMICLogic  # noqa: E402
from DiffusionMICModule.parameters import DiffusionMICParameterNode  # noqa: E402
from DiffusionMICModule.text2image import Text2ImageLogic  # noqa: E402

from DiffusionMICLib.text2image.train import pretrain  # noqa: E402

TIMEOUT = 300
PROMPT = "axial PD brain MRI"


@pytest.fixture(autouse=True)
def scene(tmp_path, monkeypatch):
    """A fresh scene, and a model cache of this test's own (where fine-tuned task models go)."""
    monkeypatch.setenv("DIFFUSIONMIC_CACHE", str(tmp_path / "cache"))
    slicer.mrmlScene = slicer.vtkMRMLScene()
    yield slicer.mrmlScene


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i-panels")
    data = root / "data"
    data.mkdir()
    rows = []
    for i in range(4):
        Image.fromarray(np.full((16, 16), 60 * i, np.uint8)).save(data / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": "axial T1 brain MRI"}))
    (data / "metadata.jsonl").write_text("\n".join(rows), encoding="utf-8")
    pretrain(data, root / "base", max_steps=1, size="tiny", resolution=16, batch_size=2)
    return root / "base"


@pytest.fixture
def logic(base, tmp_path):
    """A Text2ImageLogic whose models folder holds the tiny base (linked, as a user would put one there)."""
    logic = Text2ImageLogic(modelsDir=tmp_path / "models")
    logic.modelsDir.mkdir()
    (logic.modelsDir / "base").symlink_to(base)
    return logic


def volume(name: str, value: float = 100.0):
    """A scalar volume of 3 axial slices of 16 x 16 with a bright disc."""
    yy, xx = np.mgrid[:16, :16]
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, np.repeat((((yy - 8) ** 2 + (xx - 8) ** 2 < 30) * value)[None], 3, 0)
                                      .astype(np.float32))
    return node


def params(**values) -> DiffusionMICParameterNode:
    """The module's parameter node with the given fields (its plain dataclass form on slicer-core)."""
    return DiffusionMICParameterNode(**values)


def run(panelRun, timeout=TIMEOUT, until=lambda r: False):
    """Poll a panel's run as the Widget's timer does."""
    deadline = time.monotonic() + timeout
    while not panelRun.poll() and not until(panelRun):
        assert time.monotonic() < deadline, "the backend took too long"
        time.sleep(0.1)
    return panelRun


def slice_views(scene):
    for name in ("Red", "Yellow", "Green"):
        composite = slicer.vtkMRMLSliceCompositeNode()
        composite.SetLayoutName(name)
        scene.AddNode(composite)


# ---- what the panels send ------------------------------------------------------------------------

def test_finetune_panel_requests(tmp_path):
    pn = params()
    assert tp.canFineTune(pn) == (False, "Choose the model to fine-tune")
    pn.fineTuneBase, pn.fineTuneName = "base", "../x"
    assert tp.canFineTune(pn) == (False, "Name the new model (a plain folder name)")
    pn.fineTuneName = " pd-lora "
    assert tp.canFineTune(pn) == (False, "Choose the image folder")
    pn.fineTuneData = Path(".")                 # what the wrapper reads for an empty path field
    assert not tp.canFineTune(pn)[0]
    pn.fineTuneData, pn.fineTuneRank = tmp_path, 0
    assert tp.canFineTune(pn) == (False, "lora needs a rank of at least 1")
    pn.fineTuneRank, pn.fineTuneToken, pn.fineTuneMaxSteps = 8, "", 50
    assert tp.canFineTune(pn) == (True, "Fine-tune base into 'pd-lora'")
    assert tp.fineTuneRequest(pn) == ("text2image", {
        "base": "base", "method": "lora", "name": "pd-lora", "maxSteps": 50, "rank": 8, "priorImages": 0,
        "token": None, "dataDir": str(tmp_path)})

    a, b = volume("PD 1"), volume("PD 2")
    pn.fineTuneSource, pn.fineTuneMethod, pn.fineTuneToken = "volumes", "embedding", " PD "
    assert tp.canFineTune(pn) == (False, "Check the volumes to train on")
    pn.fineTuneVolumes = [a, None, b]
    assert tp.canFineTune(pn) == (False, "Write the caption of the volumes' slices")
    pn.fineTuneCaption = f" {PROMPT} "
    kind, request = tp.fineTuneRequest(pn)
    assert kind == "text2image" and "dataDir" not in request and request["token"] == "PD"
    assert request["volumeNodes"] == [a, b] and request["captions"] == [PROMPT, PROMPT]

    pn.fineTuneKind = "denoise"                 # a task model: data set folders only
    assert tp.canFineTune(pn)[1].startswith("Task models fine-tune on a data set folder")
    pn.fineTuneSource, pn.fineTuneBase = "folder", "brain-mri-denoise"
    assert tp.fineTuneRequest(pn) == ("task", {"task": "denoise", "model": "brain-mri-denoise",
                                               "dataDir": str(tmp_path), "name": "pd-lora", "loraRank": 8,
                                               "maxSteps": 50})


def test_text2image_panel_requests():
    pn = params()
    assert tp.canGenerate(pn) == (False, "Choose a text-to-image base")
    pn.text2imageBase, pn.text2imagePrompt = "base", "  "
    assert tp.canGenerate(pn) == (False, "Write a prompt")
    pn.text2imagePrompt, pn.text2imageCount, pn.text2imageSeed = f"{PROMPT} ", 3, 7
    assert tp.canGenerate(pn)[0]
    assert tp.generateRequest(pn) == {"base": "base", "prompt": PROMPT, "adapter": None, "count": 3, "seed": 7,
                                      "steps": 20, "guidance": 3.0}
    pn.text2imageAdapter = "pd-lora"
    assert tp.generateRequest(pn)["adapter"] == "pd-lora"


def test_base_choices_by_kind(monkeypatch, tmp_path):
    textModels = [{"name": "base", "kind": "base"}, {"name": "db", "kind": "dreambooth"},
                  {"name": "lora1", "kind": "adapter", "method": "lora", "base": str(tmp_path)}]
    assert tp.baseChoices("text2image", textModels, []) == [("base", "base"), ("db (DreamBooth)", "db")]
    tuned = tmp_path / "cache" / "finetuned" / "site-denoiser"
    tuned.mkdir(parents=True)
    (tuned / catalog.CARD).write_text(json.dumps({"task": "denoise", "training": {"finetune": {
        "base_model": "brain-mri-denoise"}}}), encoding="utf-8")
    entries = DiffusionMICLogic.models("denoise")
    assert entries[-1] == {"name": "site-denoiser", "task": "denoise", "path": str(tuned),
                           "description": "Fine-tuned from brain-mri-denoise"}
    assert tp.baseChoices("denoise", [], entries)[-1] == ("site-denoiser", str(tuned))
    assert "site-denoiser" not in [e["name"] for e in DiffusionMICLogic.models("segment")]
    # Another kind: a text-to-image base is no denoise model (cleared); a folder chosen by hand stays.
    assert tp.keptChoice("base", tp.baseChoices("denoise", textModels, entries)) == ""
    assert tp.keptChoice(str(tmp_path), tp.baseChoices("denoise", textModels, entries)) == str(tmp_path)
    assert tp.keptChoice("db", tp.baseChoices("text2image", textModels, [])) == "db"


# ---- runs through the real backend ---------------------------------------------------------------

def test_finetune_from_volumes_adds_the_adapter_to_the_lists(logic, tmp_path):
    assert tp.adapterChoices("base", logic.models(), logic.resolve) == [("(none)", "")]
    pn = params(fineTuneBase="base", fineTuneName="pd-embedding", fineTuneSource="volumes", fineTuneMethod="embedding",
                fineTuneVolumes=[volume("PD 1"), volume("PD 2", 140.0)], fineTuneCaption=PROMPT, fineTuneToken="PD",
                fineTuneMaxSteps=2)
    before = slicer.mrmlScene.GetNumberOfNodes()
    done = run(tp.startFineTune(pn, logic, DiffusionMICLogic()))
    assert done.error is None and done.result["method"] == "embedding" and done.result["images"] == 6
    assert done.percent == 100 and done.status.startswith("finetune embedding")
    assert slicer.mrmlScene.GetNumberOfNodes() == before
    assert tp.adapterChoices("base", logic.models(), logic.resolve) == [("(none)", ""),
                                                                          ("pd-embedding (embedding)", "pd-embedding")]
    assert tp.baseChoices("text2image", logic.models(), []) == [("base", "base")]   # an adapter is no base
    assert tp.adapterChoices(str(logic.modelsDir / "base"), logic.models(), logic.resolve)[1][1] == "pd-embedding"
    assert tp.adapterChoices(str(tmp_path), logic.models(), logic.resolve) == [("(none)", "")]   # another base


def test_generate_puts_volumes_into_the_scene_and_shows_the_first(logic):
    slice_views(slicer.mrmlScene)
    pn = params(text2imageBase="base", text2imagePrompt=PROMPT, text2imageCount=2, text2imageSeed=4,
                text2imageSteps=2)
    done = run(tp.startGenerate(pn, logic))
    assert done.error is None and [n.GetName() for n in done.result] == [f"{PROMPT} seed 4", f"{PROMPT} seed 5"]
    assert slicer.util.arrayFromVolume(done.result[0]).shape == (1, 16, 16)
    composites = slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode")
    assert {c.GetBackgroundVolumeID() for c in composites} == {done.result[0].GetID()}


def test_cancelled_generate_leaves_the_scene_unchanged(logic):
    pn = params(text2imageBase="base", text2imagePrompt=PROMPT, text2imageCount=16, text2imageSteps=1000)
    before = slicer.mrmlScene.GetNumberOfNodes()
    panelRun = tp.startGenerate(pn, logic)
    run(panelRun, until=lambda r: r.job.progress.get("stage", "starting") != "starting")
    assert not panelRun.done, "the run ended before it could be cancelled"
    panelRun.cancel()
    assert panelRun.poll() and panelRun.result is None and panelRun.error is None
    assert panelRun.job.process.reaped.wait(10) and not panelRun.job.workDir.exists()
    assert slicer.mrmlScene.GetNumberOfNodes() == before


def test_failed_task_finetune_lists_nothing(tmp_path):
    data = tmp_path / "not-a-dataset"
    data.mkdir()
    pn = params(fineTuneKind="denoise", fineTuneBase="brain-mri-denoise", fineTuneName="site", fineTuneData=data,
                fineTuneMaxSteps=1)
    done = run(tp.startFineTune(pn, None, DiffusionMICLogic()))
    assert isinstance(done.error, BackendError) and "dataset.json" in str(done.error)
    assert "site" not in [e["name"] for e in DiffusionMICLogic.models("denoise")]
    assert not catalog.finetunedDir().exists()
    with pytest.raises(ValueError, match="does not exist"):
        tp.startFineTune(params(fineTuneKind="denoise", fineTuneBase="brain-mri-denoise", fineTuneName="site",
                                fineTuneData=tmp_path / "missing"), None, DiffusionMICLogic())


def test_task_finetune_adds_the_model_to_the_task_panel(tmp_path):
    """The bundled denoiser fine-tuned one step on a phantom subject (15 s here)."""
    from DiffusionMICLib.phantom import write_phantom
    write_phantom(tmp_path / "site", subjects=1, seed=1, resolution=2.0, noise=5.0, lesions=1)
    pn = params(fineTuneKind="denoise", fineTuneBase="brain-mri-denoise", fineTuneName="site-denoiser",
                fineTuneData=tmp_path / "site", fineTuneMaxSteps=1, fineTuneRank=4)
    done = run(tp.startFineTune(pn, None, DiffusionMICLogic()))
    assert done.error is None
    folder = catalog.finetunedDir() / "site-denoiser"
    assert done.result["model"] == str(folder) and done.result["lora_rank"] == 4
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.safetensors"]
    assert ("site-denoiser", str(folder)) in tp.baseChoices("denoise", [], DiffusionMICLogic.models("denoise"))
