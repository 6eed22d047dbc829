"""Captioned image folders (diffusers' image-folder convention) and captioned slices of a 3D data set.

A folder of PNG/JPEG, 2D DICOM or 2D NRRD/NIfTI images with captions in ``metadata.jsonl``
(``{"file_name": ..., "text": ...}`` per line) or in a ``.txt`` file beside each image.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DiffusionMICError

PIL_SUFFIXES = (".png", ".jpg", ".jpeg")
ITK_SUFFIXES = (".dcm", ".nrrd", ".nii", ".nii.gz", ".mha")
LEVELS = ("lower", "middle", "upper")


@dataclass
class CaptionedImages:
    files: list[Path]
    captions: list[str]

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, n: int) -> "CaptionedImages":
        return CaptionedImages(self.files[:n], self.captions[:n])


def _suffix(path: Path) -> str:
    return ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix.lower()


def read_captions(folder: str | Path) -> CaptionedImages:
    """The images of a folder and their captions; every image needs one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DiffusionMICError(f"image folder '{folder}' does not exist")
    images = sorted(p for p in folder.iterdir() if p.is_file() and _suffix(p) in PIL_SUFFIXES + ITK_SUFFIXES)
    if not images:
        raise DiffusionMICError(f"'{folder}' holds no images (PNG, JPEG, DICOM, NRRD, NIfTI)")
    captions: dict[str, str] = {}
    meta = folder / "metadata.jsonl"
    if meta.is_file():
        for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    captions[row["file_name"]] = str(row["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise DiffusionMICError(f"{meta}: line {n} is not {{\"file_name\": ..., \"text\": ...}}") from e
    for p in images:
        txt = p.with_name(p.name[: -len(_suffix(p))] + ".txt")
        if p.name not in captions and txt.is_file():
            captions[p.name] = txt.read_text(encoding="utf-8").strip()
    missing = [p.name for p in images if not captions.get(p.name, "").strip()]
    if missing:
        raise DiffusionMICError(f"{len(missing)} of {len(images)} images in '{folder}' have no caption "
                                f"(e.g. {missing[0]}): give metadata.jsonl or a .txt beside each image")
    return CaptionedImages(images, [captions[p.name] for p in images])


def load_image(path: Path, resolution: int) -> np.ndarray:
    """An image as float32 RGB (3, H, W) in [-1, 1], resized to resolution x resolution."""
    from PIL import Image
    if _suffix(path) in PIL_SUFFIXES:
        img = Image.open(path).convert("RGB")
    else:
        import SimpleITK as sitk
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32).squeeze()
        if a.ndim != 2:
            raise DiffusionMICError(f"'{path.name}' is not a 2D image (shape {a.shape})")
        lo, hi = np.percentile(a, (0.5, 99.5))
        a = np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1)
        img = Image.fromarray((a * 255).round().astype(np.uint8)).convert("RGB")
    if img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0


def load_images(data: CaptionedImages, resolution: int) -> np.ndarray:
    return np.stack([load_image(p, resolution) for p in data.files])


def write_slices(dataset: str | Path, out: str | Path, *, channels: list[str] | None = None, resolution: int = 32,
                 every: int = 2, lesion_label: str = "lesion") -> int:
    """Axial slices of every case and channel as PNG with captions in metadata.jsonl.

    Caption: "axial {channel} brain MRI, {lower|middle|upper} slice[, with lesion]". The level is
    the slice's third of the brain's axial extent; "with lesion" when the label map has lesion
    voxels in it. Each volume is scaled by its brain's 99.5th percentile, cropped to the brain's
    square bounding box and resized. Returns the number of images written.
    """
    from PIL import Image

    from ..datasets import read_dataset
    from ..volume import orient
    ds = read_dataset(dataset)
    channels = channels or ds.channels
    unknown = [c for c in channels if c not in ds.channels]
    if unknown:
        raise DiffusionMICError(f"channel(s) {', '.join(unknown)} not in the data set (it has {', '.join(ds.channels)})")
    out = Path(out)
    if out.exists():
        raise DiffusionMICError(f"'{out}' exists already; choose a new folder")
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rows = []
    try:
        for case in ds.cases:
            label = orient(case.read_label(), "RAS").array if case.label is not None else None
            for channel in channels:
                a = orient(case.read(channel), "RAS").array.astype(np.float32)
                brain = label > 0 if label is not None else a > np.percentile(a, 60)
                zs = np.flatnonzero(brain.any(axis=(1, 2)))
                ys, xs = np.flatnonzero(brain.any(axis=(0, 2))), np.flatnonzero(brain.any(axis=(0, 1)))
                cy, cx = (ys[0] + ys[-1]) // 2, (xs[0] + xs[-1]) // 2
                half = max(ys[-1] - ys[0], xs[-1] - xs[0]) // 2 + 2
                scale = np.percentile(a[brain], 99.5)
                for z in zs[::every]:
                    if brain[z].sum() < 0.05 * brain.sum() / len(zs):
                        continue
                    level = LEVELS[min(2, int(3 * (z - zs[0]) / (zs[-1] - zs[0] + 1)))]
                    lesion = label is not None and lesion_label in ds.labels and bool((label[z] == ds.labels[lesion_label]).any())
                    crop = np.zeros((2 * half, 2 * half), np.float32)
                    y0, x0 = cy - half, cx - half
                    ya, yb = max(0, y0), min(a.shape[1], y0 + 2 * half)
                    xa, xb = max(0, x0), min(a.shape[2], x0 + 2 * half)
                    crop[ya - y0:yb - y0, xa - x0:xb - x0] = a[z, ya:yb, xa:xb]
                    img = (np.clip(crop / scale, 0, 1)[::-1] * 255).round().astype(np.uint8)  # anterior up
                    name = f"{case.id}_{channel}_z{z:03d}.png"
                    Image.fromarray(img).resize((resolution, resolution), Image.BICUBIC).save(tmp / name)
                    text = f"axial {channel} brain MRI, {level} slice" + (", with lesion" if lesion else "")
                    rows.append({"file_name": name, "text": text})
        if not rows:
            raise DiffusionMICError(f"no slices with brain found in '{dataset}'")
        (tmp / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return len(rows)
