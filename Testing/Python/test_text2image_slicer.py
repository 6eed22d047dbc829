"""The Fine-tune and Text-to-image panels' Logic (DiffusionMICModule/text2image.py) on real MRML
(slicer-core), through the real backend process on a tiny base built here."""
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
from DiffusionMICModule.backend import BackendError  # noqa: E402
from DiffusionMICModule.text2image import Text2ImageLogic  # noqa: E402

from DiffusionMICLib.text2image.train import pretrain  # noqa: E402

TIMEOUT = 300
PROMPT = "axial PD brain MRI"


@pytest.fixture(autouse=True)
def scene():
    slicer.mrmlScene = slicer.vtkMRMLScene()
    yield slicer.mrmlScene


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i-slicer")
    data = root / "data"
    data.mkdir()
    rows = []
    for i in range(4):
        Image.fromarray(np.full((16, 16), 60 * i, np.uint8)).save(data / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": "axial T1 brain MRI"}))
    (data / "metadata.jsonl").write_text("\n".join(rows), encoding="utf-8")
    pretrain(data, root / "base", max_steps=1, size="tiny", resolution=16, batch_size=2)
    return root / "base"


def volume(name: str, seed: int):
    """A scalar volume of 4 axial slices of 16 x 16 (a bright disc; the first slice empty)."""
    yy, xx = np.mgrid[:16, :16]
    a = np.zeros((4, 16, 16), np.float32)
    a[1:] = ((yy - 8) ** 2 + (xx - 8) ** 2 < 30) * (100.0 + seed)
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, a)
    return node


def test_finetune_from_scene_volumes_lists_the_new_model(base, tmp_path):
    logic = Text2ImageLogic(modelsDir=tmp_path / "models")
    logic.modelsDir.mkdir()
    (logic.modelsDir / "base").symlink_to(base)
    seen = []
    job = logic.startFineTune("base", "embedding", "pd-embedding", volumeNodes=[volume("PD 1", 0), volume("PD 2", 9)],
                              captions=[PROMPT, PROMPT], maxSteps=2, token="PD", onProgress=seen.append)
    assert (job.workDir / "images" / "metadata.jsonl").read_text(encoding="utf-8").count(PROMPT) == 6    # 3 non-empty slices each
    job.wait(timeout=TIMEOUT)
    result = logic.finishFineTune(job)
    assert result["method"] == "embedding" and result["images"] == 6
    assert seen and seen[-1]["stage"] == "finetune embedding" and seen[-1]["fraction"] == 1.0
    assert not job.workDir.exists()
    listed = {m["name"]: m for m in logic.models()}
    assert listed["pd-embedding"]["kind"] == "adapter" and listed["pd-embedding"]["method"] == "embedding"
    assert listed["base"]["kind"] == "base"


def test_generate_puts_images_into_the_scene(base, tmp_path):
    logic = Text2ImageLogic(modelsDir=tmp_path / "models")
    before = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    nodes = logic.generate(str(base), PROMPT, count=2, seed=4, steps=2, timeout=TIMEOUT)
    assert len(nodes) == 2 and slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == before + 2
    assert [n.GetName() for n in nodes] == [f"{PROMPT} seed 4", f"{PROMPT} seed 5"]
    arrays = [slicer.util.arrayFromVolume(n) for n in nodes]
    assert arrays[0].shape == (1, 16, 16) and not np.array_equal(arrays[0], arrays[1])
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    folder = sh.GetItemParent(sh.GetItemByDataNode(nodes[0]))
    assert sh.GetItemName(folder) == f"Text to image: {PROMPT}"


def test_cancel_leaves_no_model(base, tmp_path):
    logic = Text2ImageLogic(modelsDir=tmp_path / "models")
    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(np.full((16, 16), 90, np.uint8)).save(data / "a.png")
    (data / "a.txt").write_text(PROMPT, encoding="utf-8")
    job = logic.startFineTune(str(base), "lora", "cancelled", dataDir=str(data), maxSteps=100000)
    deadline = time.monotonic() + TIMEOUT
    while not job.poll() and job.progress.get("stage") != "finetune lora" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert job.progress.get("stage") == "finetune lora"
    job.cancel()      # returns at once; the process ends and its folders go in the background
    while (not job.poll() or job.workDir.exists()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert job.process.cancelled and job.poll()
    assert not list(logic.modelsDir.iterdir()) and not job.workDir.exists()


def test_failures_add_nothing(base, tmp_path):
    logic = Text2ImageLogic(modelsDir=tmp_path / "models")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{}", encoding="utf-8")
    before = slicer.mrmlScene.GetNumberOfNodes()
    with pytest.raises(BackendError, match="is incomplete"):
        logic.generate(str(broken), PROMPT, timeout=TIMEOUT)
    assert slicer.mrmlScene.GetNumberOfNodes() == before
    with pytest.raises(ValueError, match="unknown method"):
        logic.startFineTune(str(base), "textual", "x", dataDir=str(tmp_path))
    with pytest.raises(ValueError, match="one caption for each volume"):
        logic.startFineTune(str(base), "lora", "x", volumeNodes=[volume("v", 0)], captions=[])
    assert not (logic.modelsDir / "x").exists()
