"""The baselines' learning machinery, shared by every task's study: library networks (MONAI),
a supervised trainer on the engine's own batches, and the adapter that runs a trained baseline
through the task's own pipeline (same normalisation, grid handling, cropping and post-processing
as the diffusion model it is compared with)."""
from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load_model, save_model

from ..engine.batches import TrainingCase, random_batches
from ..engine.inference import windowed
from ..engine.network import build_network, count_parameters
from ..engine.trainer import Batch, TrainConfig, Trainer
from ..errors import DiffusionMICError
from ..models import ModelCard
from .core import Budget, Context


# ---- networks ---------------------------------------------------------------------------------

class TimeFree(torch.nn.Module):
    """The diffusion UNet (MONAI DiffusionModelUNet, same config) used as a plain regression
    network: the timestep input is held at 0."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.net = build_network(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device))


class DnCNN(torch.nn.Module):
    """DnCNN (Zhang et al. 2017): conv-ReLU, depth-2 x conv-BN-ReLU, conv; predicts the noise,
    which is subtracted from the centre input channel (residual learning).

    Built from MONAI's Convolution blocks because deepinv's DnCNN, the maintained one, imports
    torchvision, which fails beside this project's CPU torch build; a stand-in, named so in the tables.
    """

    def __init__(self, in_channels: int, out_channels: int, depth: int = 17, features: int = 64,
                 centre: int = 0):
        super().__init__()
        from monai.networks.blocks import Convolution
        layers: list[torch.nn.Module] = [Convolution(2, in_channels, features, act="relu", norm=None, bias=True)]
        layers += [Convolution(2, features, features, act="relu", norm="batch", bias=False) for _ in range(depth - 2)]
        layers.append(Convolution(2, features, out_channels, conv_only=True, bias=False))
        self.body = torch.nn.Sequential(*layers)
        self.centre = centre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x[:, self.centre:self.centre + 1]
        return c - self.body(x)


class CyclePair(torch.nn.Module):
    """CycleGAN's two generators (the diffusion UNet as a regression network, each way);
    forward runs the forward direction, A -> B."""

    def __init__(self, forward: dict[str, Any], backward: dict[str, Any]):
        super().__init__()
        self.ab, self.ba = TimeFree(forward["config"]), TimeFree(backward["config"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ab(x)


class Polynomial(torch.nn.Module):
    """A per-voxel polynomial of the input channels' intensities (every monomial up to `degree`),
    its coefficients fitted by least squares (study/translate.py's floor; no library holds it)."""

    def __init__(self, in_channels: int, degree: int):
        super().__init__()
        self.powers = [p for p in itertools.product(range(degree + 1), repeat=in_channels) if sum(p) <= degree]
        self.register_buffer("coefficients", torch.zeros(len(self.powers), dtype=torch.float64))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, ...) -> (B, K, ...): the K monomials of the channels at each voxel."""
        x = x.double()
        return torch.stack([torch.prod(torch.stack([x[:, c] ** e for c, e in enumerate(p)]), 0)
                            for p in self.powers], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        c = self.coefficients.view(1, -1, *[1] * (x.ndim - 2))
        return (f * c).sum(1, keepdim=True).to(x.dtype)


def network(kind: str, **spec: Any) -> torch.nn.Module:
    """Build a baseline network from a JSON-able spec (so a finished one can be rebuilt to load)."""
    from monai.networks import nets
    if kind == "diffusion-unet":
        return TimeFree(spec["config"])
    if kind == "cyclegan":
        return CyclePair(**spec)
    if kind == "polynomial":
        return Polynomial(**spec)
    if kind == "dncnn":
        return DnCNN(**spec)
    if kind == "attention-unet":
        return nets.AttentionUnet(spatial_dims=2, **spec)
    if kind == "var-autoencoder":
        return nets.VarAutoEncoder(**{"spatial_dims": 2, **spec})
    if kind == "generator":     # "tanh": bound the output to [-1, 1] as DCGAN's generator does
        tanh = spec.pop("tanh", False)
        generator = nets.Generator(**spec)
        return torch.nn.Sequential(generator, torch.nn.Tanh()) if tanh else generator
    if kind == "dynunet":
        return nets.DynUNet(spatial_dims=2, **spec)
    if kind == "swin-unetr":
        return nets.SwinUNETR(spatial_dims=2, **spec)
    if kind == "autoencoder":
        return nets.AutoEncoder(spatial_dims=2, **spec)
    if kind == "resnet":
        return nets.ResNet(spatial_dims=2, **spec)
    raise ValueError(f"unknown baseline network {kind!r}")


def save_baseline(folder: Path, kind: str, spec: dict[str, Any], net: torch.nn.Module, info: dict[str, Any]) -> None:
    """Weights (safetensors) and what rebuilds them (baseline.json, written last: its presence
    means the method finished training)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_model(net, str(folder / "weights.safetensors"))     # save_model: weights shared between layers (DynUNet) once
    (folder / "baseline.json").write_text(json.dumps({"kind": kind, "spec": spec, "training": info}, indent=2), encoding="utf-8")


def load_baseline(folder: Path, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    meta = json.loads((folder / "baseline.json").read_text(encoding="utf-8"))
    net = network(meta["kind"], **meta["spec"])
    load_model(net, str(folder / "weights.safetensors"))
    return net.to(device).eval(), meta


# ---- training ---------------------------------------------------------------------------------

Loss = Callable[[torch.Tensor, Batch], torch.Tensor]


class SupervisedTrainer(Trainer):
    """The engine's trainer (AdamW, EMA, clipping, learning-rate schedule, checkpoints) with a
    supervised loss instead of the denoising one: loss(network(cond), batch)."""

    def __init__(self, network: torch.nn.Module, card: ModelCard, config: TrainConfig, device: torch.device,
                 loss: Loss | None, checkpoint_dir: Path | None = None):
        super().__init__(network, card.noise_schedule, config, device, checkpoint_dir=checkpoint_dir)
        self.supervised_loss = loss

    def loss(self, batch: Batch) -> torch.Tensor:
        pred = self.model(batch.cond.to(self.device))
        return self.supervised_loss(pred.float(), batch)


def train_config(budget: Budget, **overrides: Any) -> TrainConfig:
    return TrainConfig(**{"max_steps": budget.steps, "batch_size": budget.batch_size, "lr": 1e-3,
                          "lr_schedule": "cosine", "time_limit_s": budget.time_limit_s, "ema_start": 20,
                          "checkpoint_every": 10**9, "seed": 0, **overrides})


def training_batches(card: ModelCard, cases: list[TrainingCase], config: TrainConfig, *,
                     unpaired: bool = False, augment: Callable[[Batch, torch.Generator], Batch] | None = None
                     ) -> Iterator[Batch]:
    """The engine's batches of the task's training cases (with the task's augmentation, or
    `augment`). unpaired: the conditioning comes from the first half of the cases and the target
    from the second half (different subjects)."""
    from ..tasks import get_task
    task = get_task(card.task)

    def stream(part: list[TrainingCase], seed: int) -> Iterator[Batch]:
        return random_batches(part, spatial_dims=card.spatial_dims, patch=card.patch, batch_size=config.batch_size,
                              seed=seed, focus_fraction=float(card.training.get("oversample", 0.0)),
                              augment=augment or task.augment(card))
    if not unpaired:
        return stream(cases, config.seed * 7919)
    if len(cases) < 2:
        raise DiffusionMICError("unpaired training needs at least two training subjects")
    half = len(cases) // 2
    return (Batch(b.target, a.cond, b.labels)
            for a, b in zip(stream(cases[:half], config.seed * 7919), stream(cases[half:], config.seed * 7919 + 1)))


def fit_supervised(ctx: Context, folder: Path, card: ModelCard, kind: str, spec: dict[str, Any], loss: Loss | None,
                   *, trainer_cls: type[SupervisedTrainer] = SupervisedTrainer, label: str = "",
                   augment: Callable[[Batch, torch.Generator], Batch] | None = None,
                   batches: Iterator[Batch] | None = None, train: dict[str, Any] | None = None,
                   unpaired: bool = False, cases: list[TrainingCase] | None = None,
                   **trainer_kwargs: Any) -> dict[str, Any]:
    """Train a baseline on the task's own training cases and batches (the same crops, the same
    augmentation as the diffusion model's training, or `augment` instead) for the study's budget,
    and save it. `batches` replaces the task's batches where a baseline learns from other data
    (e.g. whole slices with a per-slice class); `train` overrides optimiser settings (e.g. its lr);
    `unpaired`: conditioning and target from different subjects; `cases`: the task's training
    cases of `card`, when already loaded."""
    from ..tasks import get_task
    task = get_task(card.task)
    config = train_config(ctx.budget, **(train or {}))
    torch.manual_seed(config.seed)     # the same initial weights whatever ran before
    net = network(kind, **spec)
    if batches is None:
        cases = cases if cases is not None else task.training_cases(card, ctx.data.train, ctx.data.train_cases)
        if card.context:
            from ..engine.inference import stack_neighbours
            for c in cases:
                c.cond = stack_neighbours(c.cond, card.context) if c.cond is not None else None
        batches = training_batches(card, cases, config, unpaired=unpaired, augment=augment)
    trainer = trainer_cls(net, card, config, ctx.device, loss, **trainer_kwargs)
    ctx.progress.start(f"train {label or kind}", config.max_steps)
    t0 = time.perf_counter()
    trainer.fit(batches, on_step=lambda i, n, v: ctx.progress.advance(loss=f"{v:.4f}"), cancel=ctx.progress.cancel)
    ctx.progress.close()
    info = {"steps": trainer.step, "batch_size": config.batch_size, "lr": config.lr,
            "wall_time_s": round(time.perf_counter() - t0, 1),
            "parameters": count_parameters(net), "final_loss": float(sum(trainer.losses[-20:]) / max(1, len(trainer.losses[-20:])))}
    save_baseline(folder, kind, spec, trainer.ema.model, info)
    return info


# ---- running a baseline through the task's pipeline --------------------------------------------

class AsX0(torch.nn.Module):
    """A trained baseline in the diffusion network's place. The pipeline calls
    network(cat[x_t, cond], t); this ignores x_t and t and returns the baseline's output from
    cond as the x_0 prediction. With a one-step DDIM sampler (trailing spacing, final alpha 1)
    that prediction is exactly the sampler's result, so the task's own normalisation, grid
    handling, cropping and post-processing apply unchanged."""

    def __init__(self, net: torch.nn.Module, noisy_channels: int, post: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 factor: int = 1, window: tuple[int, ...] | None = None):
        super().__init__()
        self.net, self.skip, self.post, self.factor, self.window = net, noisy_channels, post, factor, window

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """`factor`: pad the slices to multiples of the baseline's own down-sampling factor
        (background value -1) and crop its output back. `window`: run the network instead by
        sliding windows of that size (`windowed`): a network with instance norm, trained on crops,
        then sees crop-sized statistics."""
        cond = x[:, self.skip:]
        if self.window is not None:
            out = windowed(self.net, cond, self.window)
            return self.post(out) if self.post is not None else out
        h, w = cond.shape[-2:]
        pad = [0, -w % self.factor, 0, -h % self.factor]
        out = self.net(torch.nn.functional.pad(cond, pad, value=-1.0) if any(pad) else cond)[..., :h, :w]
        return self.post(out) if self.post is not None else out


def one_step_card(card: ModelCard) -> ModelCard:
    """The diffusion card with x0 prediction and a one-step DDIM sampler (see AsX0)."""
    d = card.to_dict()
    d["schedule"] = {**d["schedule"], "prediction_type": "sample"}
    d["sampler"] = {"name": "ddim", "steps": 1}
    d["defaults"] = {**d.get("defaults", {}), "ensemble": 1}
    return ModelCard.from_dict(d)
