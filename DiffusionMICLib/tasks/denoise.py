"""Denoising: a conditional model (noisy image in, clean image out), or partial diffusion.

Training pairs come from the data set's noisy images (imagesTr) and clean targets (cleanTr).
With `noise_range` in the settings (percent of the brightest tissue), fresh Rician noise is
drawn from the clean target for every batch instead, so one model covers many noise levels.
With {"context": k} in the settings, the 2D model also sees the k slices on either side of each
slice (2.5D): their noise is independent and their anatomy nearly the same.
With {"task": {"noise_map": true}} (needs noise_range) the model is also told the noise level,
as FFDNet is: a constant map of the noise standard deviation (in the model's [-1, 1] units) as
one more conditioning image, stacked like the noisy image. In training it is each crop's drawn
level; at run time `--sigma` (the input's units) or else the input's estimated level
(`engine.noiselevel.estimate_sigma`, Immerkaer's estimator over the foreground), recorded in
RunResult.info["sigma"].
With {"orientation": "acquired"} the 2D model works on each input's acquired slices (array axis 0
along its largest voxel spacing: a coronal scan of 3 mm slices is denoised coronally) instead of
axial slices (the default, "RAS"); the phantom it trains on is isotropic and stored axially, so
training is the same either way.
With {"task": {"residual": true}} (x0 prediction only) the network's output is added to the noisy
centre slice (engine.network.ResidualDiffusionUNet): it predicts the correction, not the image.
The output is in the input's units (the normalisation is inverted).

Two augmentations of the clean crop before the noise, for scans unlike the phantom (whose tissue
intensities are few and fixed and whose anatomy is an MNI152 average, smoother than any scan):
{"task": {"gamma": [lo, hi]}} remaps the crop's [0, 1] intensities by x -> 0.5 (x / 0.5)^g, g drawn
log-uniformly (the foreground median stays, contrast and the bright tail change: fat and CSF
reach 2-3 times the median in real scans, about 1.2 in the phantom); {"task": {"texture": a}}
multiplies it by 1 + a' T, a' uniform in [0, a], T a unit-variance Gaussian random field smoothed
in-plane by sigma 0.5-1.5 voxels and the same in every stacked slice: fine structure that the
neighbouring slices share, which the model must keep (noise is independent between slices).
Both apply to the conditioning and the target alike.

Self-supervised adaptation to noisy scans without clean versions (card.training["self_supervised"],
set by `engine.pipeline.adapt`): Recorrupted-to-Recorrupted (Pang et al., CVPR 2021). With the
scan y (imagesTr) and its noise level sigma (given, or `engine.noiselevel.estimate_sigma`), every
batch draws z ~ N(0, sigma^2) and trains on the pair y + alpha z -> y - z / alpha: the two noises are
uncorrelated, so in expectation the loss is that of training towards the clean image. The noise of
the input is sqrt(1 + alpha^2) sigma, inside the range a multi-level denoiser was trained on.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from monai.networks.layers import GaussianFilter

from ..datasets import Case, Dataset
from ..engine.batches import TrainingCase
from ..engine.network import network_config
from ..engine.noiselevel import estimate_sigma
from ..engine.sampling import foreground_crop, sample_draws
from ..engine.space import ModelSpace, foreground, from_unit, robust_scale, to_unit
from ..engine.trainer import Batch
from ..errors import DiffusionMICError
from ..metrics import image_metrics
from ..models import ModelCard
from ..progress import Progress
from ..volume import Volume
from .base import RunOptions, RunResult, Task

# The median of the foreground maps to 0.5: a scale that noise hardly moves (unlike a high percentile).
NORMALISATION = {"method": "percentile", "percentile": 50, "value": 0.5}


def rician(clean01: torch.Tensor, sigma: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Rician noise on magnitudes in [0, 1] units; sigma broadcasts over the batch."""
    n1 = torch.randn(clean01.shape, generator=generator) * sigma
    n2 = torch.randn(clean01.shape, generator=generator) * sigma
    return torch.sqrt((clean01 + n1) ** 2 + n2**2)


def vary_clean(cond01: torch.Tensor, target01: torch.Tensor, spec: dict[str, Any],
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The "gamma" and "texture" augmentations (module docstring) of clean crops in [0, 1] units:
    cond (B, C, y, x) and target (B, 1, y, x), changed alike per crop."""
    b = cond01.shape[0]
    if spec.get("texture"):
        sigma = 0.5 + torch.rand(b, generator=generator)
        field = torch.randn((b, 1, *cond01.shape[2:]), generator=generator)
        field = torch.cat([GaussianFilter(2, float(sigma[i]))(field[i:i + 1]) for i in range(b)])
        field = field / field.flatten(1).std(dim=1).clamp_min(1e-6).reshape(b, 1, 1, 1)
        gain = 1 + float(spec["texture"]) * torch.rand((b, 1, 1, 1), generator=generator) * field
        cond01, target01 = cond01 * gain, target01 * gain
    if spec.get("gamma"):
        lo, hi = np.log(spec["gamma"][0]), np.log(spec["gamma"][1])
        g = torch.exp(lo + (hi - lo) * torch.rand((b, 1, 1, 1), generator=generator))
        cond01, target01 = (0.5 * (cond01.clamp_min(0) / 0.5) ** g, 0.5 * (target01.clamp_min(0) / 0.5) ** g)
    return cond01, target01


class Denoise(Task):
    name = "denoise"

    def make_card(self, dataset: Dataset, settings: dict[str, Any]) -> ModelCard:
        spec = settings.get("task", {})
        context = int(settings.get("context", 0))
        noise_map = bool(spec.get("noise_map", False))
        for key in ("noise_map", "gamma", "texture"):
            if spec.get(key) and spec.get("noise_range") is None:
                raise DiffusionMICError(f"denoise: {key} needs noise_range (the levels to train on)")
        schedule = {"num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": "v_prediction",
                    **settings.get("schedule", {})}
        residual = {"residual_input": 1 + context} if spec.get("residual") else {}   # x_t, then the centre slice
        if residual and schedule["prediction_type"] != "sample":
            raise DiffusionMICError("denoise: residual needs prediction_type 'sample' (the network's output is "
                                    "added to the noisy image)")
        return ModelCard(
            name=settings.get("name", "denoise"), task=self.name,
            inputs=["noisy"], outputs=["clean"],
            description=settings.get("description", "Conditional diffusion denoiser for brain MRI (any contrast)."),
            network=network_config(1 + (2 * context + 1) * (2 if noise_map else 1), 1,
                                   **{**settings.get("network", {}), **residual}),
            context=context, schedule=schedule, orientation=settings.get("orientation", "RAS"),
            normalisation=NORMALISATION, patch=settings.get("patch", [64, 64]),
            sampler={"name": "dpm++2m", "steps": 10, **settings.get("sampler", {})},
            defaults={"strength": 1.0, "ensemble": 1, **settings.get("defaults", {})},
            training={"config": settings.get("train", {}), "channels": spec.get("channels", dataset.channels),
                      "noise_range": spec.get("noise_range"), **({"noise_map": True} if noise_map else {}),
                      **{k: spec[k] for k in ("gamma", "texture") if spec.get(k) is not None}},
        )

    def training_cases(self, card: ModelCard, dataset: Dataset, cases: list[Case]) -> list[TrainingCase]:
        channels = card.training.get("channels") or dataset.channels
        if card.training.get("self_supervised"):
            return self._noisy_cases(card, cases, channels)
        synth = card.training.get("noise_range") is not None
        out = []
        for case in cases:
            if "cleanTr" not in case.variants:
                raise DiffusionMICError(f"denoise training needs clean targets: case {case.id} has no cleanTr images")
            for ch in channels:
                clean = case.read(ch, "cleanTr")
                noisy = clean if synth else case.read(ch)
                space = ModelSpace.enter([noisy, clean], card.orientation, card.spacing)
                scale = robust_scale(space.arrays[0], card.normalisation)
                arrays = to_unit(space.arrays, scale)
                # with synthetic noise, the conditioning holds the clean image until augment() adds the noise
                out.append(TrainingCase(target=arrays[1:], cond=arrays[1:] if synth else arrays[:1],
                                        foreground=foreground(space.arrays[1])))
        return out

    @staticmethod
    def _noisy_cases(card: ModelCard, cases: list[Case], channels: list[str]) -> list[TrainingCase]:
        """The noisy scans as both target and conditioning; records each one's noise sigma in model
        units (the given one, in the scan's units, or the estimate) under self_supervised["sigma_unit"]."""
        spec = card.training["self_supervised"]
        out, sigmas = [], []
        for case in cases:
            for ch in channels:
                space = ModelSpace.enter([case.read(ch)], card.orientation, card.spacing)
                scale = robust_scale(space.arrays[0], card.normalisation)
                given = spec.get("sigma")
                sigmas.append(2.0 * (given if given is not None else estimate_sigma(space.arrays[0])) / scale)
                noisy = to_unit(space.arrays, scale)
                out.append(TrainingCase(target=noisy, cond=noisy, foreground=foreground(space.arrays[0])))
        if min(sigmas) <= 0:
            raise DiffusionMICError("adaptation needs a noisy scan: its estimated noise level is 0 (give --sigma)")
        spec["sigma_unit"] = [round(float(v), 5) for v in sigmas]
        return out

    def augment(self, card: ModelCard):
        if card.training.get("self_supervised"):
            return self._recorrupt(card)
        if card.training.get("noise_range") is None:
            return None
        lo, hi = card.training["noise_range"]

        def add_noise(batch: Batch, generator: torch.Generator) -> Batch:
            clean01, target01 = vary_clean((batch.cond + 1) / 2, (batch.target + 1) / 2, card.training, generator)
            # clean01: the clean slice (and its neighbours, with context)
            # percent of the brightest tissue: each crop's 99th percentile (about 0.55 for T1 white
            # matter in these units, where the foreground median is 0.5)
            shape = (clean01.shape[0],) + (1,) * (clean01.ndim - 1)
            brightest = torch.quantile(clean01.flatten(1), 0.99, dim=1).reshape(shape)
            pct = lo + (hi - lo) * torch.rand(shape, generator=generator)
            sigma01 = pct / 100.0 * brightest
            cond = rician(clean01, sigma01, generator) * 2 - 1
            if noise_map:      # the level in [-1, 1] units, one map per stacked slice
                cond = torch.cat([cond, (2 * sigma01).expand_as(cond)], 1)
            return Batch(target01 * 2 - 1, cond, batch.labels)
        noise_map = bool(card.training.get("noise_map"))
        return add_noise

    @staticmethod
    def _recorrupt(card: ModelCard):
        """Recorrupted-to-Recorrupted pairs: (y + alpha z -> y - z / alpha), z ~ N(0, sigma^2) drawn
        afresh for every crop (the centre slice's z is the one taken off the target)."""
        spec = card.training["self_supervised"]
        sigma, alpha, k = float(np.mean(spec["sigma_unit"])), float(spec.get("alpha", 0.5)), int(card.context)
        # sigma_unit is in the batch's [-1, 1] units (2 / scale times the scan's)

        def recorrupt(batch: Batch, generator: torch.Generator) -> Batch:
            z = torch.randn(batch.cond.shape, generator=generator) * sigma
            cond = batch.cond + alpha * z
            if noise_map:      # the recorrupted input's level: sqrt(1 + alpha^2) sigma
                cond = torch.cat([cond, torch.full_like(cond, float(np.hypot(1.0, alpha)) * sigma)], 1)
            return Batch(batch.target - z[:, k:k + 1] / alpha, cond, batch.labels)
        noise_map = bool(card.training.get("noise_map"))
        return recorrupt

    def run(self, card: ModelCard, network: torch.nn.Module, volumes: list[Volume], options: RunOptions,
            progress: Progress, device: torch.device) -> RunResult:
        if len(volumes) != 1:
            raise DiffusionMICError(f"denoise takes one input volume, got {len(volumes)}")
        space = ModelSpace.enter(volumes, card.orientation, card.spacing)
        scale = robust_scale(space.arrays[0], card.normalisation)
        noisy = to_unit(space.arrays, scale)
        crop = foreground_crop(space.arrays)
        cond, info = noisy, {}
        if card.training.get("noise_map"):
            sigma = options.sigma if options.sigma is not None else estimate_sigma(space.arrays[0])
            info["sigma"] = {"value": round(float(sigma), 6), "estimated": options.sigma is None,
                             "percent_of_median": round(100.0 * float(sigma) / (scale / 2.0), 3)}
            cond = np.concatenate([noisy, np.full_like(noisy, 2.0 * sigma / scale)])
        progress.start("denoise", 0)
        draws = [d[0] for d in sample_draws(card, network, cond, options, device=device, progress=progress, crop=crop,
                                            start=noisy if options.strength < 1 else None, strength=options.strength)]
        progress.close()
        result = np.mean(draws, axis=0)
        denoised = from_unit(np.clip(result, -1.0, None), scale)
        out = space.leave(denoised)
        return RunResult({"output": out.with_array(out.array.astype(np.float32))}, info)

    def evaluate(self, pred: Volume, ref: Volume, mask: Volume | None) -> dict[str, Any]:
        return image_metrics(pred, ref, mask)
