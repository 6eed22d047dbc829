"""The module's panel table and what a panel shows for a model (DiffusionMICModule/panels.py):
plain Python, so the input-selector building the Widget renders is tested without Qt."""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "DiffusionMIC"))
from DiffusionMICModule import catalog, panels  # noqa: E402

SEGMENT_CARD = json.loads((REPO / "Resources" / "Models" / "brain-mri-lesion-segment" / "model.json").read_text(encoding="utf-8"))
GENERATE_CARD = json.loads((REPO / "Resources" / "Models" / "brain-mri-generate" / "model.json").read_text(encoding="utf-8"))


def test_every_catalog_task_has_a_panel():
    tasks = {entry["task"] for entry in catalog.readCatalog(REPO)}
    assert tasks <= set(panels.TASKS)
    assert panels.panel("segment").outputClass == "vtkMRMLSegmentationNode"


def test_four_input_segmentation_model_gets_four_labelled_selectors():
    view = panels.describeModel(panels.panel("segment"), "brain-mri-lesion-segment", SEGMENT_CARD)
    assert [s.label for s in view.slots] == ["Input (T1):", "Input (T2):", "Input (PD):", "Input (FLAIR):"]
    assert [s.index for s in view.slots] == [0, 1, 2, 3]
    assert view.defaults["steps"] == SEGMENT_CARD["sampler"]["steps"] and "T1, T2, PD, FLAIR" in view.toolTip
    # Volumes named after their contrast fill the selectors ("T1 clean" is not the T1).
    volumes = [(name, name) for name in ("DiffusionMIC phantom T1 clean", "DiffusionMIC phantom FLAIR",
                                         "DiffusionMIC phantom T1", "DiffusionMIC phantom T2", "my_pd_scan")]
    chosen = panels.matchInputs(view.slots, volumes)
    assert chosen == ["DiffusionMIC phantom T1", "DiffusionMIC phantom T2", "my_pd_scan", "DiffusionMIC phantom FLAIR"]
    ok, why = panels.canApply(panels.panel("segment"), "brain-mri-lesion-segment", chosen, view.slots)
    assert ok and why == "Run Segment"
    # The user's own choice stays; a contrast no volume is named after stays empty.
    assert panels.matchInputs(view.slots, volumes[:2], current=["mine"]) == ["mine", None, None, volumes[1][1]]
    assert panels.canApply(panels.panel("segment"), "brain-mri-lesion-segment", ["a", None, "c", "d"], view.slots) == (
        False, "Choose the input volume(s)")


def test_slots_without_a_card_and_for_generate():
    assert panels.inputSlots(panels.panel("denoise"), None) == (panels.InputSlot(0, ""),)
    assert panels.InputSlot(0, "").label == "Input volume:"
    assert panels.matchInputs(panels.inputSlots(panels.panel("denoise"), None), [("a", 1), ("b", 2)]) == [1]
    view = panels.describeModel(panels.panel("generate"), "brain-mri-generate", GENERATE_CARD)
    assert view.slots == () and view.conditions == ("healthy", "lesion")
    assert panels.canApply(panels.panel("generate"), "brain-mri-generate", [], view.slots) == (True, "Run Generate")
    empty = panels.describeModel(panels.panel("translate"), "", None)
    assert empty.info == "No translate model in the catalog yet." and empty.defaults == catalog.FALLBACK_DEFAULTS
    assert panels.canApply(panels.panel("translate"), "", ["x"], empty.slots) == (False, "Choose a model")


def test_generate_from_labels_takes_one_label_map():
    """A model trained from label maps (card inputs ["labels"]) gets one label-map selector,
    filled with the scene's first label map, never with an intensity volume."""
    fromLabels = panels.describeModel(panels.panel("generate"), "labels-model", {"inputs": [panels.LABELS]})
    assert fromLabels.slots == (panels.InputSlot(0, "labels"),) and fromLabels.slots[0].isLabelMap
    assert fromLabels.slots[0].label == "Label map:"
    volumes, labelMaps = [("T1", "t1-node")], [("seg", "seg-node"), ("other", "other-node")]
    assert panels.matchInputs(fromLabels.slots, volumes, [], labelMaps) == ["seg-node"]
    assert panels.matchInputs(fromLabels.slots, volumes, [], []) == [None]
    assert panels.matchInputs(fromLabels.slots, volumes, ["other-node"], labelMaps) == ["other-node"]
    assert panels.canApply(panels.panel("generate"), "labels-model", [None], fromLabels.slots) == (
        False, "Choose the label map")
    assert panels.canApply(panels.panel("generate"), "labels-model", [], fromLabels.slots)[0] is False
    assert panels.canApply(panels.panel("generate"), "labels-model", ["seg-node"], fromLabels.slots)[0] is True
    # Back to a plain generator: no selector, and the label map chosen before is not carried.
    plain = panels.inputSlots(panels.panel("generate"), GENERATE_CARD)
    assert plain == () and panels.carryInputs(fromLabels.slots, ["seg-node"], plain) == []


def test_lesion_map_generator_takes_an_optional_lesion_mask():
    """A lesion-map generator gets one optional label-map selector that is never filled for the
    user: Apply runs with or without a mask."""
    card = {**GENERATE_CARD, "training": {"lesion_map": True}}
    view = panels.describeModel(panels.panel("generate"), "lesion-map-model", card)
    slot = panels.InputSlot(0, panels.LESIONS, optional=True)
    assert view.slots == (slot,) and slot.isLabelMap and slot.label == "Lesion mask (optional):"
    labelMaps = [("seg", "seg-node")]
    assert panels.matchInputs(view.slots, [("T1", "t1-node")], [], labelMaps) == [None]
    assert panels.matchInputs(view.slots, [], ["seg-node"], labelMaps) == ["seg-node"]
    for inputs in ([], [None], ["seg-node"]):
        assert panels.canApply(panels.panel("generate"), "lesion-map-model", inputs, view.slots) == (True, "Run Generate")
    # the lesion load box: enabled for this model only; its "off" (0) reaches Logic.start as 0
    assert view.lesionLoad and not panels.describeModel(panels.panel("generate"), "g", GENERATE_CARD).lesionLoad
    sampling = dict(catalog.FALLBACK_DEFAULTS)
    options = panels.runOptions(panels.panel("generate"), sampling,
                                {"count": 1, "condition": "lesion", "lesionLoad": 12.5}, "cpu")
    assert options["lesionLoad"] == 12.5 and options["condition"] == "lesion"


def test_another_model_keeps_the_volumes_of_the_same_contrast():
    segment = panels.inputSlots(panels.panel("segment"), SEGMENT_CARD)
    flairOnly = panels.inputSlots(panels.panel("anomaly"), {"inputs": ["FLAIR"]})
    assert panels.carryInputs(segment, ["t1", "t2", "pd", "flair"], flairOnly) == ["flair"]
    assert panels.carryInputs(flairOnly, ["flair"], segment) == [None, None, None, "flair"]


def test_run_options_from_the_panel():
    sampling = dict(catalog.FALLBACK_DEFAULTS, steps=3)
    assert panels.runOptions(panels.panel("generate"), sampling, {"count": 2, "condition": ""}, "cpu") == {
        **sampling, "device": "cpu", "count": 2, "condition": None, "lesionLoad": None}
    assert "count" not in panels.runOptions(panels.panel("denoise"), sampling, {}, "auto")
    assert panels.runOptions(panels.panel("denoise"), sampling, {"adapt": 200}, "auto")["adapt"] == 200


def test_anomaly_panel_offers_segmenters_against_a_healthy_cohort(tmp_path):
    """The tissue atlas in the Anomaly panel: segmenters are listed after the anomaly models, need a
    healthy folder before Apply, and only they pass it on (`run anomaly --healthy`)."""
    anomaly = panels.panel("anomaly")
    entries = panels.modelEntries(anomaly, lambda task: catalog.modelsForTask(task, REPO))
    tasks = [e["task"] for e in entries]
    assert tasks[0] == "anomaly" and "segment" in tasks and tasks == sorted(tasks)    # anomaly models first
    atlas = next(e for e in entries if e["name"] == "brain-mri-lesion-segment")
    assert atlas["description"].startswith(panels.ATLAS)
    assert not any(e["description"].startswith(panels.ATLAS) for e in entries if e["task"] == "anomaly")
    view = panels.describeModel(anomaly, "brain-mri-lesion-segment", SEGMENT_CARD)
    reconstruction = panels.describeModel(anomaly, "brain-mri-anomaly", {"task": "anomaly", "inputs": ["FLAIR"]})
    assert view.healthy and not reconstruction.healthy and len(view.slots) == 4
    inputs = ["t1", "t2", "pd", "flair"]
    assert panels.canApply(anomaly, "brain-mri-lesion-segment", inputs, view.slots, view.healthy, Path(".")) == (
        False, "Choose the folder of healthy subjects (a data set with the same contrasts)")
    assert panels.canApply(anomaly, "brain-mri-lesion-segment", inputs, view.slots, view.healthy, tmp_path)[0]
    assert panels.canApply(anomaly, "brain-mri-anomaly", ["flair"], reconstruction.slots, reconstruction.healthy,
                           Path("."))[0]
    sampling = dict(catalog.FALLBACK_DEFAULTS)
    assert panels.runOptions(anomaly, sampling, {"healthy": tmp_path}, "auto", view)["healthy"] == str(tmp_path)
    assert panels.runOptions(anomaly, sampling, {"healthy": tmp_path}, "auto", reconstruction)["healthy"] is None
    assert panels.runOptions(anomaly, sampling, {"healthy": Path(".")}, "auto", view)["healthy"] is None
    assert panels.modelEntries(panels.panel("segment"), lambda task: catalog.modelsForTask(task, REPO)) == (
        catalog.modelsForTask("segment", REPO))


def test_extension_packages_every_module_file():
    import re
    listed = set(re.findall(r"\$\{MODULE_NAME\}Module/(\w+\.py)", (REPO / "DiffusionMIC" / "CMakeLists.txt").read_text(encoding="utf-8")))
    assert listed == {p.name for p in (REPO / "DiffusionMIC" / "DiffusionMICModule").glob("*.py")}
