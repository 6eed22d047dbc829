"""The flows every task shares: train a model from a data set, and sample a whole volume."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch

from ..datasets import read_dataset
from ..errors import DiffusionMICError
from ..models import REPO_ROOT, ModelCard, load_model, read_card, resolve_model, save_model
from ..progress import Progress
from .batches import random_batches
from .inference import (bounding_box, count_batches, count_windows, infer_patches, infer_slices,
                        stack_neighbours)
from .lora import add_lora, merge_lora, parameter_counts
from .network import build_network, downsampling_factor
from .sampler import conditioned, sample
from .space import foreground
from .trainer import TrainConfig, Trainer

if TYPE_CHECKING:
    from ..tasks.base import RunOptions

Noise = Callable[[tuple[int, ...], torch.Generator], torch.Tensor]


def select_device(name: str = "auto") -> torch.device:
    """'auto' takes CUDA, then Apple MPS, then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DiffusionMICError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DiffusionMICError("device 'cuda' requested but CUDA is not available")
    return device


def sample_volume(card: ModelCard, network: torch.nn.Module, cond: np.ndarray | None, *, sampler: str,
                  steps: int, generator: torch.Generator, device: torch.device, progress: Progress,
                  start: np.ndarray | None = None, strength: float = 1.0, class_label: int | None = None,
                  guidance: float = 1.0, noise: Noise | None = None, batch_size: int = 16,
                  shape: tuple[int, int, int] | None = None, crop: tuple[slice, ...] | None = None) -> np.ndarray:
    """Sample one (C_out, z, y, x) model-space array for a whole volume.

    cond: conditioning channels; start: the image to partially diffuse from (strength < 1);
    both (C, z, y, x) in [-1, 1]. The progress counts sampler steps across all batches.
    """
    out_channels = card.network["out_channels"]
    if cond is not None and card.context:
        cond = stack_neighbours(cond, card.context)
    n_cond = 0 if cond is None else cond.shape[0]
    stacked = [a for a in (cond, start) if a is not None]
    inputs = np.concatenate(stacked) if stacked else None
    shape = shape or tuple(inputs.shape[1:])
    factor = downsampling_factor(card.network)
    null_class = len(card.classes) if card.classes else None

    def predict(x: torch.Tensor | None, out_shape: tuple[int, ...]) -> torch.Tensor:
        c = s = None
        if x is not None:
            x = x.to(device)
            c = x[:, :n_cond] if n_cond else None
            s = x[:, n_cond:] if start is not None else None
        labels = None if class_label is None else torch.full((out_shape[0],), class_label, dtype=torch.long, device=device)
        model = conditioned(network, c, labels, null_class, guidance)
        return sample(model, out_shape, card.noise_schedule, sampler=sampler, steps=steps, generator=generator,
                      start=s, strength=strength if s is not None else 1.0,
                      noise=noise(out_shape, generator) if noise is not None else None,
                      device=device, on_step=lambda i, n: progress.advance(), cancel=progress.cancel)

    region = tuple(s.stop - s.start for s in crop) if crop else shape
    steps_per_sample = steps if start is None else max(1, min(steps, round(steps * strength)))
    if card.spatial_dims == 2:
        n = count_batches(region[0], batch_size)
        progress.steps += n * steps_per_sample
        return infer_slices(predict, inputs, out_channels, shape, factor=factor, batch_size=batch_size, crop=crop)
    patch = tuple(card.patch) if card.patch else None
    n = count_windows(region, patch, 0.25) if patch and inputs is not None else 1
    progress.steps += n * steps_per_sample
    return infer_patches(predict, inputs, out_channels, shape, factor=factor, patch=patch, crop=crop)


def sample_draws(card: ModelCard, network: torch.nn.Module, cond: np.ndarray | None, options: "RunOptions", *,
                 device: torch.device, progress: Progress, **kwargs: Any) -> Iterator[np.ndarray]:
    """`options.ensemble` whole-volume draws (seeds seed, seed + 1, ...), one at a time; kwargs go to sample_volume."""
    for k in range(options.ensemble):
        yield sample_volume(card, network, cond, sampler=options.sampler, steps=options.steps,
                            generator=torch.Generator().manual_seed(options.seed + k), device=device,
                            progress=progress, batch_size=options.batch_size, **kwargs)


def foreground_crop(raw: np.ndarray, margin: int = 4) -> tuple[slice, ...]:
    """The bounding box of the Otsu foreground of any channel of raw (C, z, y, x) intensities."""
    return bounding_box(np.logical_or.reduce([foreground(c) for c in raw]), margin)


def git_commit() -> str:
    """The checkout's commit, with "-dirty" when tracked library files differ from it; "unknown" outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        return (commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no", "--", "DiffusionMICLib")
                          else "")) if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load_settings(config: str | Path | None) -> dict[str, Any]:
    if config is None:
        return {}
    path = Path(config)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DiffusionMICError(f"cannot read training config '{path}': {e}") from None


def _run_record(training: dict[str, Any]) -> dict[str, Any]:
    """One training run as the card's history lists it: its command, commit, the step and the
    total wall time it ended at, and its learning-rate schedule."""
    config = training.get("config", {})
    return {"command": training.get("command", ""), "commit": training.get("commit"), "steps": training.get("steps"),
            "wall_time_s": training.get("wall_time_s"), "lr": config.get("lr"),
            "lr_schedule": config.get("lr_schedule", "constant"), "max_steps": config.get("max_steps")}


def train(task_name: str, data: str | Path, out: str | Path, *, settings: dict[str, Any] | None = None,
          max_steps: int | None = None, device: str = "auto", progress: Progress | None = None,
          resume: bool = True, base: tuple[ModelCard, torch.nn.Module] | None = None,
          lora_rank: int = 0, trainer_cls: type[Trainer] = Trainer) -> ModelCard:
    """Train (or, with `base`, fine-tune: all weights, or rank-`lora_rank` adapters) a task's model
    on a data set and save the model folder. `trainer_cls`: a Trainer with another training loss
    (the study's peer recipe)."""
    from ..tasks import get_task   # tasks import the engine, not the other way round

    commit = git_commit()     # the code this training starts from (checked first: the modules are loaded by now)
    task = get_task(task_name)
    settings = dict(settings or {})
    progress = progress or Progress()
    dev = select_device(device)
    dataset = read_dataset(data)
    cases = [c for c in dataset.cases if c.id not in set(settings.get("exclude", []))]
    if "cases" in settings:
        cases = [c for c in cases if c.id in set(settings["cases"])]
    if not cases:
        raise DiffusionMICError(f"no training cases left in '{data}'")
    if base is not None:
        card, network = base
        finetuned = {"base_model": card.name, "base_sha256": card.sha256, "lora_rank": lora_rank}
        card = ModelCard.from_dict({**card.to_dict(), "metrics": {}, "sha256": ""})
        if lora_rank:
            network = add_lora(network, lora_rank)
        finetuned["trainable_parameters"], finetuned["parameters"] = parameter_counts(network)
    else:
        card = task.make_card(dataset, settings)
        network = build_network(card.network)
    tc = {**card.training.get("config", {}), **settings.get("train", {})}
    config = TrainConfig(**{k: v for k, v in tc.items() if k in TrainConfig.__dataclass_fields__})
    if max_steps is not None:
        config.max_steps = max_steps
    torch.manual_seed(config.seed)
    progress.start("load data", len(cases))
    training_cases = task.training_cases(card, dataset, cases)
    for example in training_cases:
        if example.cond is not None and card.context:
            example.cond = stack_neighbours(example.cond, card.context)
    progress.advance(len(cases))
    out = Path(out)
    trainer = trainer_cls(network, card.noise_schedule, config, dev,
                      num_classes=len(card.classes) or None, checkpoint_dir=out / "checkpoint",
                      noise_fn=task.training_noise(card, dev))
    resumed = resume and trainer.resume()
    batches = random_batches(training_cases, spatial_dims=card.spatial_dims, patch=card.patch,
                             batch_size=config.batch_size, seed=config.seed * 7919 + trainer.rank + trainer.step,
                             focus_fraction=float(card.training.get("oversample", 0.0)),
                             augment=task.augment(card))
    progress.start("train", config.max_steps, done=trainer.step)
    t0 = time.perf_counter()
    trainer.fit(batches, on_step=lambda i, n, loss: progress.advance(loss=f"{loss:.4f}"), cancel=progress.cancel)
    progress.close()
    wall = time.perf_counter() - t0
    runs: list[dict[str, Any]] = []
    if resumed and (out / "model.json").is_file():     # add the earlier runs' training time and commands
        earlier = read_card(out).training
        wall += earlier.get("wall_time_s", 0.0)
        runs = earlier.get("runs") or [_run_record(earlier)]
    card.training = {
        **card.training,   # task-specific training settings (noise range, variant, oversampling)
        "data": str(Path(data)), "cases": [c.id for c in cases], "config": config.to_dict(),
        "steps": trainer.step, "wall_time_s": round(wall, 1), "device": str(dev),
        "world_size": trainer.world, "commit": commit,
        "command": settings.get("command", ""),
        "final_loss": float(np.mean(trainer.losses[-20:])) if trainer.losses else None,
        **({"finetune": finetuned} if base is not None else {}),
    }
    card.training["runs"] = runs + [_run_record(card.training)]
    if "name" in settings:
        card.name = settings["name"]
    if trainer.rank == 0:
        trainer.save_checkpoint()
        with torch.inference_mode():
            shipped = merge_lora(trainer.ema.model)
            task.calibrate(card, shipped, dataset, cases, dev, progress)
        save_model(out, card, shipped, half=bool(settings.get("half", False)))
    trainer.close()
    return card


# A fine-tuning run starts from trained weights: fewer, smaller steps than the base's training
# (the adapters take a larger learning rate than full fine-tuning), decaying to the end.
FINETUNE_TRAIN = {"max_steps": 500, "lr_schedule": "cosine", "time_limit_s": None, "ema_start": 0}
FINETUNE_LR = {"lora": 5e-4, "full": 1e-4}


def finetune(task_name: str, model: str | Path, data: str | Path, out: str | Path, *, lora_rank: int = 8,
             settings: dict[str, Any] | None = None, max_steps: int | None = None, device: str = "auto",
             progress: Progress | None = None, resume: bool = True) -> ModelCard:
    """Fine-tune a trained model on a (small) data set: rank-`lora_rank` LoRA adapters merged into
    the weights afterwards, or all weights with lora_rank=0. The base model is left as it was;
    the new folder's card names it. `settings` may hold "train" overrides, "cases", "name"."""
    if lora_rank < 0:
        raise DiffusionMICError(f"LoRA rank must be 0 (all weights) or more, got {lora_rank}")
    folder = resolve_model(model)
    if Path(out).resolve() == folder.resolve():
        raise DiffusionMICError(f"--out '{out}' is the base model's own folder; choose another")
    card, network = load_model(folder)
    if card.task != task_name:
        raise DiffusionMICError(f"model '{card.name}' is a {card.task} model, not a {task_name} model")
    settings = dict(settings or {})
    lr = FINETUNE_LR["lora" if lora_rank else "full"]
    settings["train"] = {**FINETUNE_TRAIN, "lr": lr, **settings.get("train", {})}
    settings.setdefault("name", f"{card.name}-finetuned")
    return train(task_name, data, out, settings=settings, max_steps=max_steps, device=device, progress=progress,
                 resume=resume, base=(card, network), lora_rank=lora_rank)
