"""`import DiffusionMICLib` loads nothing heavy; its names are imported on first use."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_package_import_loads_neither_torch_nor_monai():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    code = ("import json, sys, DiffusionMICLib; "
            "print(json.dumps([m for m in ('torch', 'monai', 'diffusers', 'SimpleITK') if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_every_exported_name_resolves():
    import DiffusionMICLib as dmic
    for name in dmic.__all__:
        assert getattr(dmic, name) is getattr(__import__(f"DiffusionMICLib.{dmic._EXPORTS[name]}",
                                                         fromlist=[name]), name)
    try:
        dmic.no_such_name
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("an unknown name must raise AttributeError")


def test_phantom_needs_neither_torch_nor_monai(tmp_path):
    """Slicer's sample data writes the phantom before PyTorch may be installed."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    code = ("import json, sys\n"
            "from DiffusionMICLib.cli import main\n"
            f"main(['phantom', {str(tmp_path)!r}, '--subjects', '1', '--progress', 'none'])\n"
            "print(json.dumps([m for m in ('torch', 'monai') if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=300)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
    assert (tmp_path / "dataset.json").is_file()
