"""Training data sets: nnU-Net v2 raw layout and Medical Segmentation Decathlon layout."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import DiffusionMICError
from .volume import Volume, VolumeError, read_volume


@dataclass(frozen=True)
class ChannelRef:
    path: Path
    index: int | None = None    # the 4th-dimension index in an MSD 4D image


@dataclass
class Case:
    id: str
    images: dict[str, ChannelRef]                         # channel name -> file
    label: Path | None = None
    variants: dict[str, dict[str, ChannelRef]] = field(default_factory=dict)  # e.g. cleanTr, healthyTr

    def read(self, channel: str, variant: str | None = None) -> Volume:
        refs = self.images if variant is None else self.variants.get(variant, {})
        if channel not in refs:
            where = "images" if variant is None else variant
            raise DiffusionMICError(f"case {self.id} has no channel {channel!r} in {where}")
        return read_channel(refs[channel])

    def read_label(self) -> Volume:
        if self.label is None:
            raise DiffusionMICError(f"case {self.id} has no label map")
        return read_volume(self.label)


@dataclass
class Dataset:
    root: Path
    channels: list[str]
    labels: dict[str, int]
    cases: list[Case]


def read_channel(ref: ChannelRef) -> Volume:
    if ref.index is None:
        return read_volume(ref.path)
    image = sitk.ReadImage(str(ref.path))
    if image.GetDimension() != 4:
        raise VolumeError(f"cannot use '{ref.path}': expected a 4D image with channels, got {image.GetDimension()}D")
    return Volume.from_sitk(image[:, :, :, ref.index])


def read_dataset(root: str | Path) -> Dataset:
    """Read dataset.json (nnU-Net v2 if it has channel_names, MSD if it has modality/training)."""
    root = Path(root)
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise DiffusionMICError(f"'{root}' is not a data set: no dataset.json")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if "channel_names" in meta:
        return _read_nnunet(root, meta)
    if "modality" in meta and "training" in meta:
        return _read_msd(root, meta)
    raise DiffusionMICError(f"'{meta_path}' is neither nnU-Net v2 (channel_names) nor MSD (modality, training)")


def _read_nnunet(root: Path, meta: dict) -> Dataset:
    ending = meta.get("file_ending", ".nii.gz")
    channels = [meta["channel_names"][k] for k in sorted(meta["channel_names"], key=int)]
    labels = {str(k): int(v) for k, v in meta.get("labels", {}).items()}
    ids = sorted(p.name[: -len(ending) - 5] for p in (root / "imagesTr").glob(f"*_0000{ending}"))
    if not ids:
        raise DiffusionMICError(f"'{root / 'imagesTr'}' holds no <case>_0000{ending} files")

    def refs(folder: str, case: str) -> dict[str, ChannelRef]:
        out = {}
        for i, name in enumerate(channels):
            p = root / folder / f"{case}_{i:04d}{ending}"
            if p.is_file():
                out[name] = ChannelRef(p)
        return out

    cases = []
    for case in ids:
        images = refs("imagesTr", case)
        if len(images) != len(channels):
            raise DiffusionMICError(f"case {case} lacks some channels in '{root / 'imagesTr'}'")
        label = root / "labelsTr" / f"{case}{ending}"
        variants = {d.name: refs(d.name, case) for d in sorted(root.iterdir())
                    if d.is_dir() and d.name not in ("imagesTr", "labelsTr", "imagesTs")}
        cases.append(Case(case, images, label if label.is_file() else None,
                          {k: v for k, v in variants.items() if v}))
    return Dataset(root, channels, labels, cases)


def _read_msd(root: Path, meta: dict) -> Dataset:
    channels = [meta["modality"][k] for k in sorted(meta["modality"], key=int)]
    labels = {str(v): int(k) for k, v in meta.get("labels", {}).items()}
    cases = []
    for entry in meta["training"]:
        image = (root / entry["image"]).resolve()
        cid = Path(entry["image"]).name.split(".")[0]
        label = (root / entry["label"]).resolve() if entry.get("label") else None
        if len(channels) == 1:
            images = {channels[0]: ChannelRef(image)}
        else:
            images = {name: ChannelRef(image, i) for i, name in enumerate(channels)}
        cases.append(Case(cid, images, label))
    if not cases:
        raise DiffusionMICError(f"'{root / 'dataset.json'}' lists no training cases")
    return Dataset(root, channels, labels, cases)


def has_lesion(case: Case, lesion_label: int) -> bool:
    return bool(np.any(case.read_label().array == lesion_label))
