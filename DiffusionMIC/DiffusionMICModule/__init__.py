"""Helpers of the DiffusionMIC Slicer module (not part of DiffusionMICLib, which stays Slicer-free).

backend: the library's command line as a background process (no slicer, no Qt)
catalog: model catalog, model cards and Python requirements, without importing torch
mrml:    volumes to/from files, segmentations, tables, subject hierarchy, views (MRML only)
compat:  stand-ins for Slicer's Qt-based Python packages when running on slicer-core
"""
