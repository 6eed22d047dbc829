"""One trainer for every task: AdamW, EMA, gradient clipping, mixed precision, checkpoints, DDP.

Multi-GPU/multi-process training: launch with `torchrun --nproc_per_node N diffusion-mic train ...`;
the trainer sees WORLD_SIZE and wraps the network in DistributedDataParallel (gloo on the CPU,
nccl on CUDA). Each rank draws its own batches; rank 0 writes checkpoints and the model.
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..errors import Cancelled, DiffusionMICError
from .schedule import NoiseSchedule

LR_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    """Optimisation settings; recorded in the model card."""

    max_steps: int = 2000
    batch_size: int = 16
    lr: float = 2e-4
    lr_schedule: str = "constant"   # or "cosine": lr * (0.01 + 0.99 * (1 + cos(pi * step / max_steps)) / 2)
    weight_decay: float = 1e-4
    ema_decay: float = 0.995
    ema_start: int = 50
    grad_clip: float = 1.0
    class_dropout: float = 0.15     # probability of the null class (classifier-free guidance)
    seed: int = 0
    amp: bool = True                # bf16 autocast on CUDA where supported
    checkpoint_every: int = 200
    time_limit_s: float | None = None   # stop early after this much training time (demo, smoke runs)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise DiffusionMICError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Batch:
    target: torch.Tensor                 # x_0, (B, C, *spatial)
    cond: torch.Tensor | None = None     # concatenated conditioning, (B, Cc, *spatial)
    labels: torch.Tensor | None = None   # class labels (B,), long
    weight: torch.Tensor | None = None   # per-voxel loss weight, (B, 1, *spatial); None: uniform


def distributed_env() -> tuple[int, int]:
    """(rank, world_size) from torchrun's environment; (0, 1) when not distributed."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def weighted_mean(error: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of a per-voxel error (B, C, *spatial), weighted per voxel when `weight` (B, 1, *spatial) is given."""
    if weight is None:
        return error.mean()
    w = weight.to(error.device).expand_as(error)
    return (w * error).sum() / w.sum()


class EMA:
    """Exponential moving average of the weights (the weights that are shipped)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, decay: float | None = None) -> None:
        d = self.decay if decay is None else decay
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - d)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


class Trainer:
    """Trains a diffusion network to predict epsilon or v for the batches it is given."""

    def __init__(self, network: torch.nn.Module, schedule: NoiseSchedule, config: TrainConfig,
                 device: torch.device, num_classes: int | None = None,
                 checkpoint_dir: Path | None = None,
                 noise_fn: Callable[[tuple[int, ...], torch.Generator], torch.Tensor] | None = None,
                 x0_loss: Callable[[torch.Tensor, Batch], torch.Tensor] | None = None):
        self.rank, self.world = distributed_env()
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.device = device
        self.config = config
        self.schedule = schedule
        self.noise_scheduler = schedule.training_scheduler()
        self.alphas = self.noise_scheduler.alphas_cumprod.to(device)
        self.timesteps = schedule.training_timesteps()
        self.network = network.to(device)
        # a short run must not ship weights dominated by its first steps: cap the EMA horizon at a tenth of the run
        self.ema = EMA(self.network, min(config.ema_decay, 1 - 10 / max(config.max_steps, 20)))
        self.null_class = num_classes
        self.model = DistributedDataParallel(self.network) if self.world > 1 else self.network
        self.optimizer = torch.optim.AdamW(self.network.parameters(), lr=config.lr,
                                           weight_decay=config.weight_decay)
        self.step = 0
        self.losses: list[float] = []
        self.seconds = 0.0          # training time of every run so far (carried by the checkpoint)
        self.checkpoint_dir = checkpoint_dir
        self.generator = torch.Generator().manual_seed(config.seed * 1000 + self.rank)
        self.amp_dtype = torch.bfloat16 if config.amp and self._bf16_ok() else None
        # the forward process's noise: noise_fn(shape, generator) (e.g. simplex), else Gaussian
        self.noise_fn = noise_fn
        # a task's term on the x0 prediction, added to the MSE (x0-prediction models only)
        self.x0_loss = x0_loss
        if x0_loss is not None and schedule.prediction_type != "sample":
            raise DiffusionMICError("a loss on the x0 prediction needs prediction_type 'sample'")

    def _bf16_ok(self) -> bool:
        # CUDA only: bf16 autocast measured about 2x slower than float32 on this CPU.
        return self.device.type == "cuda" and torch.cuda.is_bf16_supported()

    def loss(self, batch: Batch) -> torch.Tensor:
        """The denoising loss of one batch (MSE on epsilon or v)."""
        x0 = batch.target.to(self.device)
        b = x0.shape[0]
        noise = (self.noise_fn(tuple(x0.shape), self.generator) if self.noise_fn is not None
                 else torch.randn(x0.shape, generator=self.generator)).to(self.device)
        t = self.timesteps[torch.randint(0, len(self.timesteps), (b,), generator=self.generator)].to(self.device)
        a = self.alphas[t].view(b, *[1] * (x0.ndim - 1))
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = {"epsilon": noise, "sample": x0,
                  "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0}[self.schedule.prediction_type]
        inp = xt if batch.cond is None else torch.cat([xt, batch.cond.to(self.device)], dim=1)
        kwargs = {}
        if batch.labels is not None:
            labels = batch.labels.to(self.device).clone()
            drop = torch.rand(b, generator=self.generator).to(self.device) < self.config.class_dropout
            labels[drop] = self.null_class
            kwargs["class_labels"] = labels
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            pred = self.model(inp, t, **kwargs)
        loss = weighted_mean((pred.float() - target) ** 2, batch.weight)
        return loss if self.x0_loss is None else loss + self.x0_loss(pred.float(), batch)

    def learning_rate(self, step: int) -> float:
        """The learning rate of step `step` (0-based). A function of the step alone, not a
        torch LR scheduler, so a resumed run, even one with a larger max_steps, needs no extra state."""
        if self.config.lr_schedule == "constant":
            return self.config.lr
        progress = min(step / max(self.config.max_steps, 1), 1.0)
        return self.config.lr * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress)))

    def fit(self, batches: Iterator[Batch], on_step: Callable[[int, int, float], None] | None = None,
            cancel: Callable[[], bool] | None = None) -> list[float]:
        """Train until config.max_steps; returns the per-step losses of this call."""
        torch.manual_seed(self.config.seed)
        self.network.train()
        losses = []
        t0, seconds = time.perf_counter(), self.seconds
        while self.step < self.config.max_steps:
            if self.config.time_limit_s is not None and time.perf_counter() - t0 > self.config.time_limit_s:
                break
            if cancel is not None and cancel():
                raise Cancelled("cancelled")
            for group in self.optimizer.param_groups:
                group["lr"] = self.learning_rate(self.step)
            loss = self.loss(next(batches))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.config.grad_clip)
            self.optimizer.step()
            self.step += 1
            self.seconds = seconds + time.perf_counter() - t0
            # warm-up: copy weights early so the EMA does not average in the random initialisation
            self.ema.update(self.network, 0.0 if self.step <= self.config.ema_start else None)
            losses.append(loss.item())
            if on_step is not None:
                on_step(self.step, self.config.max_steps, losses[-1])
            if self.checkpoint_dir and self.step % self.config.checkpoint_every == 0:
                self.save_checkpoint()
        self.losses += losses
        return losses

    def checkpoint_path(self) -> Path:
        assert self.checkpoint_dir is not None
        return self.checkpoint_dir / "checkpoint.pt"

    def save_checkpoint(self) -> None:
        """Rank 0 writes network, EMA, optimiser, step and RNG state (atomically)."""
        if self.rank != 0 or self.checkpoint_dir is None:
            return
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        state = {"network": self.network.state_dict(), "ema": self.ema.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "step": self.step,
                 "generator": self.generator.get_state(), "losses": torch.tensor(self.losses),
                 "seconds": torch.tensor(self.seconds, dtype=torch.float64), "extra": self.extra_state()}
        tmp = self.checkpoint_path().with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint_path())

    def resume(self) -> bool:
        """Load the checkpoint if there is one (weights_only: no pickled code is run)."""
        if self.checkpoint_dir is None or not self.checkpoint_path().exists():
            return False
        state = torch.load(self.checkpoint_path(), map_location=self.device, weights_only=True)
        self.network.load_state_dict(state["network"])
        self.ema.model.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.generator.set_state(state["generator"])
        self.losses = state["losses"].tolist()
        self.seconds = float(state["seconds"]) if "seconds" in state else 0.0
        self.load_extra_state(state.get("extra", {}))
        return True

    def extra_state(self) -> dict:
        """What a subclass adds to the checkpoint (e.g. a discriminator and its optimiser)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore what extra_state saved."""

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            # every rank reaches this point before any tears down its connections: otherwise gloo
            # can abort a rank whose peer has already closed the socket ("Connection closed by peer")
            dist.barrier()
            dist.destroy_process_group()

