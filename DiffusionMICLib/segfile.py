"""Label maps as Slicer segmentation files (.seg.nrrd, written by slicerio): one named, coloured
segment per label, which Slicer loads as a Segmentation node."""
from __future__ import annotations

import os
import secrets
from pathlib import Path

import numpy as np
import slicerio
from matplotlib.colors import TABLEAU_COLORS, to_rgb

from .volume import Volume, VolumeError

SEG_NRRD = ".seg.nrrd"


def is_seg_nrrd(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(SEG_NRRD)


def segment_colours(count: int) -> list[tuple[float, float, float]]:
    """`count` distinct RGB colours in [0, 1] (Tableau's ten, repeated)."""
    palette = [to_rgb(c) for c in TABLEAU_COLORS.values()]
    return [palette[i % len(palette)] for i in range(count)]


def write_segmentation(labels: Volume, path: str | os.PathLike, names: dict[str, int]) -> Path:
    """Write a label map as a .seg.nrrd with a segment per non-zero value of `names` (name -> value),
    atomically (temporary file, then rename), on exactly the label map's grid."""
    path = Path(path)
    if not is_seg_nrrd(path):
        raise VolumeError(f"cannot write '{path}': a segmentation file's name ends with {SEG_NRRD}")
    values = labels.array
    if values.dtype.kind not in "biu":
        raise VolumeError(f"cannot write '{path}': a segmentation needs integer labels, not {values.dtype}")
    named = sorted(((v, n) for n, v in names.items() if v != 0), key=lambda vn: vn[0])
    g = labels.geometry
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = np.reshape(g.direction, (3, 3)) @ np.diag(g.spacing)
    ijk_to_lps[:3, 3] = g.origin
    segmentation = {
        "voxels": np.ascontiguousarray(values.transpose(2, 1, 0)), "ijkToLPS": ijk_to_lps,
        "containedRepresentationNames": ["Binary labelmap"], "masterRepresentation": "Binary labelmap",
        "segments": [{"id": f"Segment_{v}", "name": n, "labelValue": int(v), "layer": 0, "color": list(c)}
                     for (v, n), c in zip(named, segment_colours(len(named)))],
    }
    tmp = path.parent / f".tmp-{secrets.token_hex(4)}-{path.name}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        slicerio.write_segmentation(str(tmp), segmentation)
        os.replace(tmp, path)
    except (OSError, ValueError) as e:
        tmp.unlink(missing_ok=True)
        raise VolumeError(f"cannot write '{path}': {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return path
