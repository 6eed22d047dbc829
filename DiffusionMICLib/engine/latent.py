"""Latent diffusion (Rombach et al. 2022; Pinaya et al.'s brain LDM; MONAI MAISI): a MONAI
AutoencoderKL compresses whole volumes, the diffusion UNet learns and samples its latents, and
the decoder turns a sampled latent into the image.

Stage 1 trains the autoencoder on random 3D crops of the training volumes with MONAI's recipe:
L1 reconstruction + kl_weight x the KL divergence to N(0, I) + adversarial_weight x a
least-squares patch adversarial loss (MONAI PatchDiscriminator, from step adversarial_start),
but without its perceptual loss, which needs a downloaded network. Stage 2 encodes every
training volume and its left-right mirror to the posterior mean, scales the latents to unit
variance (scale_factor = 1 / their standard deviation, as Rombach et al.) and trains the
diffusion UNet on them. Both stages checkpoint and resume; a finished autoencoder
(OUT/autoencoder/autoencoder.safetensors) is not trained again.

A latent model folder holds one safetensors file: the UNet's weights under "unet.", the
autoencoder's under "autoencoder.". The card's "latent" holds the autoencoder's config, its
scale factor and its training record.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.networks.nets import AutoencoderKL
from safetensors.torch import load_file, save_file

from ..errors import DiffusionMICError
from ..progress import Progress
from .adversarial import Critic
from .batches import TrainingCase, random_batches, whole_crop
from .inference import windowed
from .network import build_network
from .schedule import NoiseSchedule
from .trainer import Batch, TrainConfig, Trainer, weighted_mean

# MONAI's 3D brain LDM tutorial's autoencoder, without attention (its cost on a CPU at 2 mm) and
# with 16 groups; 4x down-sampling, 3 latent channels.
AUTOENCODER: dict[str, Any] = {"spatial_dims": 3, "channels": [32, 64, 64], "latent_channels": 3,
                               "num_res_blocks": 1, "attention_levels": [False, False, False],
                               "norm_num_groups": 16, "with_encoder_nonlocal_attn": False,
                               "with_decoder_nonlocal_attn": False}
# Stage 1: MONAI's loss weights; crops of the training volumes, `oversample` of them centred on
# a rare bright voxel (see `bright`).
STAGE1: dict[str, Any] = {"patch": [48, 48, 48], "oversample": 0.0, "kl_weight": 1e-6, "adversarial_weight": 0.01,
                          "adversarial_start": 500, "discriminator": {"channels": 32, "num_layers_d": 3},
                          "train": {"max_steps": 2000, "batch_size": 2, "lr": 1e-4, "ema_decay": 0.999,
                                    "ema_start": 100, "checkpoint_every": 100}}
WEIGHTS = "autoencoder.safetensors"
RECORD = "autoencoder.json"


def latent_spec(settings: dict[str, Any], channels: int) -> dict[str, Any]:
    """The card's "latent" entry from a training config's "autoencoder" settings."""
    network = {**AUTOENCODER, **settings.get("network", {}), "spatial_dims": 3,
               "in_channels": channels, "out_channels": channels}
    if "attention_levels" not in settings.get("network", {}):
        network["attention_levels"] = [False] * len(network["channels"])
    if any(c % network["norm_num_groups"] for c in network["channels"]):
        raise DiffusionMICError(f"autoencoder: norm_num_groups={network['norm_num_groups']} must divide every "
                                f"channel count {network['channels']}")
    stage1 = {**STAGE1, **{k: v for k, v in settings.items() if k not in ("network", "train")},
              "train": {**STAGE1["train"], **settings.get("train", {})}}
    return {"autoencoder": network, "scale_factor": None, "stage1": stage1}


def autoencoder_factor(latent: dict[str, Any]) -> int:
    """Image sizes are this many times the latent sizes."""
    return 2 ** (len(latent["autoencoder"]["channels"]) - 1)


def build_autoencoder(config: dict[str, Any]) -> AutoencoderKL:
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    return AutoencoderKL(**kwargs)


class LatentModel(torch.nn.Module):
    """The diffusion UNet over an autoencoder's latents; calling it calls the UNet (so the
    samplers and the trainer use it as any diffusion network); encode/decode cross spaces.

    With `window` (the autoencoder's training crop) both run by Gaussian-weighted sliding windows
    of that size (MONAI, as MAISI does): the autoencoder's GroupNorm statistics are those of its
    training crops, and a whole volume, mostly background, has others. Measured on the study's
    autoencoder (32^3 crops): whole 2 mm volumes came back with brain L1 0.64-0.70 in [-1, 1]
    units, by 32^3 windows 0.15-0.20, as its crops (0.16-0.18)."""

    def __init__(self, unet: torch.nn.Module, autoencoder: AutoencoderKL, scale_factor: float | None = None,
                 window: tuple[int, ...] | None = None, factor: int = 1):
        super().__init__()
        self.unet, self.autoencoder = unet, autoencoder
        self.scale_factor = scale_factor
        self.window, self.factor = window, factor       # factor: image size / latent size

    @staticmethod
    def _windowed(fn: Any, x: torch.Tensor, roi: tuple[int, ...] | None, fill: float) -> torch.Tensor:
        """fn over x in one piece when x fits in roi, else by windows of roi (4 at a time: 3D)."""
        if roi is None or all(s <= r for s, r in zip(x.shape[2:], roi)):
            return fn(x)
        return windowed(fn, x, roi, batch_size=4, fill=fill)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.unet(*args, **kwargs)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, z, y, x) in [-1, 1] -> scaled latents (the posterior mean)."""
        return self._windowed(lambda t: self.autoencoder.encode(t)[0], x, self.window, -1.0) * (self.scale_factor or 1.0)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        roi = tuple(w // self.factor for w in self.window) if self.window else None
        return self._windowed(self.autoencoder.decode, z / (self.scale_factor or 1.0), roi, 0.0)


def build_model(network: dict[str, Any], latent: dict[str, Any] | None) -> torch.nn.Module:
    """The card's network: the diffusion UNet, or with `latent` a LatentModel around it."""
    unet = build_network(network)
    if not latent:
        return unet
    return LatentModel(unet, build_autoencoder(latent["autoencoder"]), latent.get("scale_factor"),
                       tuple(latent["stage1"]["patch"]), autoencoder_factor(latent))


class AutoencoderTrainer(Trainer):
    """The engine's trainer (AdamW, EMA, clipping, schedule, checkpoints) with MONAI's
    autoencoder losses; the critic's weights and optimiser go into the checkpoint too."""

    def __init__(self, autoencoder: AutoencoderKL, schedule: NoiseSchedule, config: TrainConfig,
                 device: torch.device, stage1: dict[str, Any], channels: int, checkpoint_dir: Path | None = None):
        super().__init__(autoencoder, schedule, config, device, checkpoint_dir=checkpoint_dir)
        self.critic = Critic({**stage1["discriminator"], "spatial_dims": 3, "in_channels": channels}, device)
        self.kl_weight = float(stage1["kl_weight"])
        self.adversarial_weight = float(stage1["adversarial_weight"])
        self.adversarial_start = int(stage1["adversarial_start"])
        self.parts: dict[str, float] = {}

    def loss(self, batch: Batch) -> torch.Tensor:
        x = batch.target.to(self.device)
        recon, mu, sigma = self.model(x)
        kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2)) - 1).flatten(1).sum(1).mean()
        l1 = weighted_mean((recon - x).abs(), batch.weight)
        loss = l1 + self.kl_weight * kl
        self.parts = {"l1": float(l1.detach()), "kl": float(kl.detach())}
        if self.adversarial_weight and self.step >= self.adversarial_start:
            self.critic.step(x, recon)
            loss = loss + self.adversarial_weight * self.critic.fooled(recon)
        return loss

    def extra_state(self) -> dict:
        return {"critic": self.critic.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        if "critic" in state:
            self.critic.load_state_dict(state["critic"])


def brain(target: np.ndarray) -> np.ndarray:
    """Where crops are centred: voxels above the background in any channel."""
    return np.logical_or.reduce([c > -0.95 for c in target])


def bright(target: np.ndarray, fraction: float = 0.005) -> np.ndarray:
    """(N, 3) indices of each channel's brightest `fraction` of brain voxels (nnU-Net-style
    oversampling without labels: lesions, the FLAIR hyperintensities an L1 loss otherwise
    averages away, are among them)."""
    mask = brain(target)
    if not mask.any():
        return np.argwhere(mask)
    return np.argwhere(np.logical_or.reduce([mask & (c > np.quantile(c[mask], 1.0 - fraction)) for c in target]))


def fit_autoencoder(latent: dict[str, Any], model: LatentModel, cases: list[TrainingCase], folder: Path,
                    schedule: NoiseSchedule, device: torch.device, progress: Progress) -> dict[str, Any]:
    """Stage 1 on the image-space training cases, or the finished autoencoder in `folder`
    loaded; returns its training record."""
    weights, record = folder / WEIGHTS, folder / RECORD
    if weights.is_file() and record.is_file():
        model.autoencoder.load_state_dict(load_file(str(weights)))
        return json.loads(record.read_text(encoding="utf-8"))
    stage1 = latent["stage1"]
    config = TrainConfig(**{k: v for k, v in stage1["train"].items() if k in TrainConfig.__dataclass_fields__})
    torch.manual_seed(config.seed)
    trainer = AutoencoderTrainer(model.autoencoder, schedule, config, device, stage1,
                                 latent["autoencoder"]["in_channels"], checkpoint_dir=folder / "checkpoint")
    trainer.resume()
    oversample = float(stage1.get("oversample", 0.0))
    crops = [TrainingCase(target=c.target, foreground=brain(c.target),
                          focus=[bright(c.target)] if oversample else None, weight=c.weight) for c in cases]
    batches = random_batches(crops, spatial_dims=3, patch=list(stage1["patch"]), batch_size=config.batch_size,
                             seed=config.seed * 7919 + trainer.step, focus_fraction=oversample)
    progress.start("train autoencoder", config.max_steps, done=trainer.step)
    trainer.fit(batches, on_step=lambda i, n, loss: progress.advance(loss=f"{trainer.parts.get('l1', loss):.4f}"),
                cancel=progress.cancel)
    progress.close()
    trainer.save_checkpoint()
    model.autoencoder.load_state_dict(trainer.ema.model.state_dict())
    info = {"steps": trainer.step, "batch_size": config.batch_size, "patch": list(stage1["patch"]),
            "wall_time_s": round(trainer.seconds, 1), "config": config.to_dict(),
            "final_loss": float(np.mean(trainer.losses[-20:])) if trainer.losses else None}
    if trainer.rank == 0:      # with DDP every rank holds the same EMA weights; one writes them
        save_finished(model.autoencoder, info, folder)
    return info


def save_finished(autoencoder: AutoencoderKL, record: dict[str, Any], folder: Path) -> None:
    """Write a finished stage 1 into folder: the weights (atomically), then the training record,
    last: it marks the stage finished."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS
    tmp = weights.with_suffix(".tmp")
    save_file({k: v.contiguous().cpu() for k, v in autoencoder.state_dict().items()}, str(tmp))
    os.replace(tmp, weights)
    (folder / RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


@torch.no_grad()
def encode_cases(model: LatentModel, cases: list[TrainingCase], device: torch.device) -> list[TrainingCase]:
    """Each case and its left-right mirror as scaled latents (unscaled when the model has no
    scale factor yet: the caller sets it from them); a case's loss weight goes onto the latent
    grid as the largest weight under each latent voxel, its conditioning channels as their
    mean over each latent voxel."""
    model.autoencoder.eval()
    out = []
    for case in cases:
        x = torch.from_numpy(case.target[None]).to(device)
        w = c = None
        if case.weight is not None:
            w = torch.nn.functional.max_pool3d(torch.from_numpy(case.weight)[None, None].float(), model.factor)[0, 0]
        if case.cond is not None:
            c = latent_grid(torch.from_numpy(case.cond).float(), model.factor)

        def mirrored(t: torch.Tensor | None, mirror: bool) -> np.ndarray | None:
            return None if t is None else (t.flip(-1) if mirror else t).numpy()
        for mirror in (False, True):
            z = model.encode(x.flip(-1) if mirror else x)[0].cpu().numpy()
            out.append(TrainingCase(target=z, cond=mirrored(c, mirror), label=case.label,
                                    foreground=whole_crop(z.shape[1:]), weight=mirrored(w, mirror)))
    return out


def latent_grid(maps: torch.Tensor, factor: int) -> torch.Tensor:
    """(C, z, y, x) maps on the image grid -> their means over each latent voxel."""
    return torch.nn.functional.avg_pool3d(maps[None], factor)[0]


def prepare(latent: dict[str, Any], model: LatentModel, cases: list[TrainingCase], folder: Path,
            schedule: NoiseSchedule, device: torch.device, progress: Progress) -> list[TrainingCase]:
    """The diffusion UNet's training cases: the autoencoder trained (or loaded) when the card
    has no scale factor yet, then every case encoded; fills latent["scale_factor"] and
    latent["training"] and freezes the autoencoder."""
    if latent.get("scale_factor") is None:
        latent["training"] = fit_autoencoder(latent, model, cases, folder, schedule, device, progress)
        t0 = time.perf_counter()
        model.scale_factor = None
        encoded = encode_cases(model, cases, device)
        std = float(np.std(np.concatenate([c.target.ravel() for c in encoded])))
        if not np.isfinite(std) or std <= 0:
            raise DiffusionMICError(f"the autoencoder's latents have standard deviation {std}: training failed")
        latent["scale_factor"] = model.scale_factor = round(1.0 / std, 6)
        for c in encoded:
            c.target = c.target * model.scale_factor
        latent["training"]["encode_s"] = round(time.perf_counter() - t0, 1)
    else:
        model.scale_factor = latent["scale_factor"]
        encoded = encode_cases(model, cases, device)
    model.autoencoder.requires_grad_(False)
    return encoded
