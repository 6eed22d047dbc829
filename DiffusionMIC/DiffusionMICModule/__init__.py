"""Parts of the DiffusionMIC Slicer module, by concern (not DiffusionMICLib, which stays Slicer-free).

logic:     DiffusionMICLogic: runs, compare, sample data, training (no Qt)
jobs:      background runs (DiffusionMICJob) and their results
results:   a run's output files into the scene: names, import, display
backend:   the library's command line as a background process (no slicer, no Qt)
panels:    the task panels as a table; input selectors and options from a model card (no Qt, no MRML)
panelview: one panel's Qt widgets, filled as panels.py says (Slicer's application only)
text2image: Text2ImageLogic: text-to-image fine-tuning and generation on MRML (no Qt)
text2imagepanel: the Fine-tune and Text-to-image panels: choices, requests, runs (no Qt)
text2imageview: those two panels' Qt widgets (Slicer's application only)
parameters: the parameter node (parameterNodeWrapper)
install:   torch (PyTorchUtils) and Resources/requirements.txt: check, and install after asking
catalog:   model catalog, model cards and Python requirements, without importing torch
mrml:      volumes to/from files, segmentations, tables, subject hierarchy (MRML only)
views:     side by side with linked views, and back
sampledata: the "DiffusionMIC brain phantom" sample data button
selftest:  the body of DiffusionMICTest
compat:    Slicer's Qt-based Python packages, or stand-ins on slicer-core
"""
