"""Anomaly detection by tissue out of place (a tissue atlas): a segmenter's class probabilities
for a case against those of healthy subjects of the same protocol, each registered onto the case.
Grey matter inside white matter, lesion tissue, CSF where the cohort has none score whatever their
intensity, which a reconstruction model's residual misses (study: `diffusion-mic study anomaly`,
the diffusion-tissue-atlas row).

    atlas = TissueAtlas("brain-mri-lesion-segment", healthy)   # healthy: [[T1, T2, PD, FLAIR], ...]
    result = atlas.detect([t1, t2, pd, flair])                 # outputs "output" (map), "mask"

The healthy subjects are segmented once; `detect` segments the case, registers each healthy
subject's anchor contrast (T1 when the segmenter takes it) onto the case's (affine,
`registration.affine`) and carries their probabilities through it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .datasets import read_dataset
from .errors import DiffusionMICError
from .inputs import align_inputs
from .models import read_card, resolve_model
from .progress import Progress, ProgressCallback, as_progress
from .registration import affine, carry
from .tasks.anomaly import TOP_FRACTION, brain_mask, top_mean
from .tasks.base import RunResult
from .volume import Volume

# Chosen on the study's held-out grey-matter-like phantom subjects among slack 1/3/5 voxels and
# smoothing 1/1.5 (README, anomaly study): the cohort's frequencies max-filtered over SLACK voxels
# (what affine registration leaves misaligned), the excess smoothed by SMOOTH voxels.
SLACK = 3
SMOOTH = 1.5
# The mask's default level (summed probability excess): about the best-Dice threshold on the study's
# validation subjects of the grey-matter-like, T1-dark and tumour kinds (0.19-0.21); no healthy
# test voxel exceeded those there.
THRESHOLD = 0.2


def out_of_place(p: np.ndarray, cohort: list[np.ndarray], brain: np.ndarray) -> np.ndarray:
    """Tissue out of place: class probabilities p (C, z, y, x; background first) against healthy
    subjects' on the same grid (averaged, max-filtered over SLACK voxels): the sum over tissues
    of max(p - atlas, 0), smoothed by SMOOTH voxels, zero outside `brain`."""
    atlas = ndimage.maximum_filter(np.mean(cohort, axis=0), size=(1, *[SLACK] * 3))
    m = ndimage.gaussian_filter(np.clip(p[1:] - atlas[1:], 0.0, None).sum(0), SMOOTH)
    return np.where(brain, m, 0.0).astype(np.float32)


class TissueAtlas:
    """A segmenter and healthy subjects' class probabilities; `detect` scores a case against them."""

    def __init__(self, segmenter: str | Path, healthy: list[list[Volume]], *, device: str = "auto",
                 progress: Progress | ProgressCallback | None = None):
        card = read_card(resolve_model(segmenter))
        if card.task != "segment":
            raise DiffusionMICError(f"model '{card.name}' is a {card.task} model: a tissue atlas needs a segment model")
        if not healthy:
            raise DiffusionMICError("a tissue atlas needs at least one healthy subject")
        self.segmenter, self.inputs, self.device = segmenter, list(card.inputs), device
        self.anchor = self.inputs.index("T1") if "T1" in self.inputs else 0
        bar = as_progress(progress)
        bar.start("atlas: healthy subjects", len(healthy))
        self.subjects: list[tuple[Volume, np.ndarray]] = []
        for volumes in healthy:
            volumes = self._check(volumes)
            self.subjects.append((volumes[self.anchor], self.probabilities(volumes)))
            bar.advance()
        bar.close()

    @classmethod
    def from_folder(cls, segmenter: str | Path, folder: str | Path, **kwargs) -> "TissueAtlas":
        """Healthy subjects from a data set folder (nnU-Net v2 or MSD layout) whose channels are
        named as the segmenter's inputs (e.g. T1, T2, PD, FLAIR)."""
        inputs = read_card(resolve_model(segmenter)).inputs
        data = read_dataset(folder)
        missing = [ch for ch in inputs if ch not in data.channels]
        if missing:
            raise DiffusionMICError(f"healthy data set '{folder}' lacks channel(s) {', '.join(missing)} that the "
                                    f"segmenter takes ({', '.join(inputs)})")
        return cls(segmenter, [[case.read(ch) for ch in inputs] for case in data.cases], **kwargs)

    def _check(self, volumes: list[Volume]) -> list[Volume]:
        if len(volumes) != len(self.inputs):
            raise DiffusionMICError(f"the segmenter takes {' + '.join(self.inputs)}: give {len(self.inputs)} volumes "
                                    f"in that order, got {len(volumes)}")
        return align_inputs(list(volumes))[0]

    def probabilities(self, volumes: list[Volume]) -> np.ndarray:
        """The segmenter's class probabilities (C, z, y, x) on the first volume's grid."""
        from .api import segment     # the API imports the tasks, which this module's callers may be loading
        return segment(volumes, self.segmenter, device=self.device).arrays["probabilities"]

    def register(self, volumes: list[Volume]) -> list[sitk.Transform]:
        """Each healthy subject's affine transform onto a case (anchor contrast onto anchor contrast)."""
        return [affine(volumes[self.anchor], anchor) for anchor, _ in self.subjects]

    def detect(self, volumes: list[Volume], *, threshold: float = THRESHOLD,
               transforms: list[sitk.Transform] | None = None,
               progress: Progress | ProgressCallback | None = None,
               cancel: Callable[[], bool] | None = None) -> RunResult:
        """The map of tissue out of place on the first volume's grid ("output"), "mask" = map >
        threshold, info["score"] = the mean of its top 0.1 % in the brain; zero where a healthy
        subject's grid does not reach after registration. `transforms`: the
        healthy subjects' registrations onto this case, if already made (`register`)."""
        volumes = self._check(volumes)
        bar = as_progress(progress, cancel)
        bar.start("atlas: case", 1 + len(self.subjects))
        p = self.probabilities(volumes)
        bar.advance()
        ref = volumes[self.anchor]
        cohort, covered = [], np.ones(ref.array.shape, bool)
        for i, (anchor, q) in enumerate(self.subjects):
            t = transforms[i] if transforms is not None else affine(ref, anchor)
            cohort.append(carry(q, anchor, ref, t))
            # where a healthy subject's grid does not reach (a thinner slab), it says nothing about the tissue:
            # its probabilities sum to 1 on its grid and are carried as 0 outside it
            covered &= cohort[-1].sum(0) > 0.5
            bar.advance()
        bar.close()
        # the brain as the task's maps have it (Otsu union, holes filled), eroded by 1 voxel: registration
        # leaves the brain's edge misaligned, and tissue "out of place" there lit up healthy subjects
        brain = ndimage.binary_erosion(brain_mask(np.stack([v.array for v in volumes])), border_value=1) & covered
        m = out_of_place(p, cohort, brain)
        out = volumes[0].with_array(m)
        binary = m > threshold
        info = {"score": top_mean(m[brain], TOP_FRACTION), "threshold": float(threshold),
                "mask_voxels": int(binary.sum()),
                "mask_ml": round(float(binary.sum() * np.prod(out.spacing)) / 1000.0, 3),
                "healthy_subjects": len(self.subjects), "segmenter": str(self.segmenter)}
        return RunResult({"output": out, "mask": out.with_array(binary.astype(np.uint8))}, info)
