"""The flows above the tasks: train a task's model from a data set, or fine-tune a trained one."""
from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..datasets import read_dataset
from ..errors import DiffusionMICError
from ..models import LABEL_INPUT, REPO_ROOT, ModelCard, load_model, read_card, resolve_model, save_model
from ..progress import Progress
from ..tasks import get_task
from ..volume import Volume, read_volume, write_volume
from .batches import TrainingCase, random_batches
from .inference import stack_neighbours
from .lora import add_lora, merge_lora, parameter_counts
from .latent import RECORD, LatentModel, build_model, prepare, save_finished
from .sampling import select_device
from .space import scaled_range
from .trainer import TrainConfig, Trainer


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
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DiffusionMICError(f"cannot read training config '{path}': {e}") from None


def input_range(cases: list[TrainingCase], earlier: list[float] | None = None) -> list[float]:
    """The intensity range of the images the network was given (conditioning, or the target of an
    unconditional model) in units of their robust scale, joined with an `earlier` one."""
    ranges = [scaled_range(((c.cond if c.cond is not None else c.target) + 1.0) / 2.0) for c in cases]
    ranges += [tuple(earlier)] if earlier else []
    return [round(min(r[0] for r in ranges), 4), round(max(r[1] for r in ranges), 4)]


def _run_record(training: dict[str, Any]) -> dict[str, Any]:
    """One training run as the card's history lists it: its command, commit, the step and the
    total wall time it ended at, and its learning-rate schedule."""
    config = training.get("config", {})
    return {"command": training.get("command", ""), "commit": training.get("commit"), "steps": training.get("steps"),
            "wall_time_s": training.get("wall_time_s"), "lr": config.get("lr"),
            "lr_schedule": config.get("lr_schedule", "constant"), "max_steps": config.get("max_steps")}


def start_from(network: torch.nn.Module, model: str | Path) -> dict[str, Any]:
    """Start `network`'s diffusion UNet from a trained model's (settings "init"): tensors of equal
    shape are copied; one with more input channels here (dim 1: the first convolution of a UNet
    given new conditioning channels) gets the model's weights in its first channels and zeros in
    the rest, so the new inputs start with no effect (as InstructPix2Pix extends Stable
    Diffusion's first convolution). The autoencoder of a latent model is not taken from it."""
    card, base = load_model(model)

    def unet(n: torch.nn.Module) -> torch.nn.Module:
        return n.unet if isinstance(n, LatentModel) else n
    theirs, mine = unet(base).state_dict(), unet(network).state_dict()
    if theirs.keys() != mine.keys():
        raise DiffusionMICError(f"init: model '{card.name}' has another network architecture than this one")
    for key, old in theirs.items():
        new = mine[key]
        if new.shape == old.shape:
            new.copy_(old)
        elif (new.ndim == old.ndim > 1 and new.shape[0] == old.shape[0] and new.shape[2:] == old.shape[2:]
              and new.shape[1] > old.shape[1]):
            new.zero_()
            new[:, :old.shape[1]] = old
        else:
            raise DiffusionMICError(f"init: model '{card.name}''s {key} is {tuple(old.shape)}, this network's "
                                    f"{tuple(new.shape)}")
    unet(network).load_state_dict(mine)
    return {"model": card.name, "sha256": card.sha256}


def autoencoder_source(settings: dict[str, Any]) -> tuple[ModelCard, LatentModel] | None:
    """The trained latent model whose autoencoder a new one reuses (settings "autoencoder":
    {"from": MODEL}), loaded and hash-checked; None when the autoencoder is trained here."""
    spec = settings.get("autoencoder")
    if not isinstance(spec, dict) or "from" not in spec:
        return None
    if set(spec) != {"from"}:
        raise DiffusionMICError("'autoencoder': {\"from\": MODEL} reuses that model's autoencoder as it is; "
                                f"drop the other settings ({', '.join(sorted(set(spec) - {'from'}))})")
    card, network = load_model(spec["from"])
    if not isinstance(network, LatentModel):
        raise DiffusionMICError(f"'autoencoder' from model '{card.name}': it is not a latent diffusion model")
    return card, network


def adopt_autoencoder(source: tuple[ModelCard, LatentModel], folder: Path) -> None:
    """Write the source model's autoencoder into folder as a finished stage 1 (once): its weights,
    then its training record (last: it marks the stage finished), naming the model it came from."""
    if (folder / RECORD).is_file():
        return
    card, network = source
    save_finished(network.autoencoder, {**card.latent["training"], "from": {"model": card.name, "sha256": card.sha256}},
                  folder)


def train(task_name: str, data: str | Path, out: str | Path, *, settings: dict[str, Any] | None = None,
          max_steps: int | None = None, device: str = "auto", progress: Progress | None = None,
          resume: bool = True, base: tuple[ModelCard, torch.nn.Module] | None = None,
          lora_rank: int = 0, trainer_cls: type[Trainer] = Trainer) -> ModelCard:
    """Train (or, with `base`, fine-tune: all weights, or rank-`lora_rank` adapters) a task's model
    on a data set and save the model folder. `trainer_cls`: a Trainer with another training loss
    (the study's peer recipe)."""
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
    source = None
    if base is not None:
        card, network = base
        finetuned = {"base_model": card.name, "base_sha256": card.sha256, "lora_rank": lora_rank}
        card = ModelCard.from_dict({**card.to_dict(), "metrics": {}, "sha256": ""})
    else:
        source = autoencoder_source(settings)
        if source is not None:      # the card's autoencoder and stage-1 settings are the source's
            latent = source[0].latent
            settings["autoencoder"] = {**latent["stage1"], "network": latent["autoencoder"]}
        card = task.make_card(dataset, settings)
        if source is not None and card.latent["autoencoder"]["in_channels"] != latent["autoencoder"]["in_channels"]:
            raise DiffusionMICError(f"'autoencoder' from model '{source[0].name}' encodes "
                                    f"{', '.join(source[0].outputs)}; this model generates {', '.join(card.outputs)}")
        if "autoencoder" in settings and not card.latent:
            raise DiffusionMICError(f"'autoencoder' settings (latent diffusion) are for whole-volume generation "
                                    f"models only, not {task_name} models")
    tc = {**card.training.get("config", {}), **settings.get("train", {})}
    config = TrainConfig(**{k: v for k, v in tc.items() if k in TrainConfig.__dataclass_fields__})
    if max_steps is not None:
        config.max_steps = max_steps
    torch.manual_seed(config.seed)       # the initial weights too: the same settings train the same model
    if base is None:
        network = build_model(card.network, card.latent)
        if settings.get("init"):
            card.training["init"] = start_from(network, settings["init"])
    progress.start("load data", len(cases))
    training_cases = task.training_cases(card, dataset, cases)
    if card.inputs and LABEL_INPUT not in card.inputs:
        card.input_range = input_range(training_cases, card.input_range if base is not None else None)
    for example in training_cases:
        if example.cond is not None and card.context:
            example.cond = stack_neighbours(example.cond, card.context)
    progress.advance(len(cases))
    out = Path(out)
    if card.latent:     # stage 1 (the autoencoder), then the UNet learns the cases' latents
        if source is not None:
            adopt_autoencoder(source, out / "autoencoder")
        training_cases = prepare(card.latent, network, training_cases, out / "autoencoder", card.noise_schedule,
                                 dev, progress)
    if base is not None:
        if lora_rank:
            network = add_lora(network, lora_rank)
        finetuned["trainable_parameters"], finetuned["parameters"] = parameter_counts(network)
    trainer = trainer_cls(network, card.noise_schedule, config, dev,
                      num_classes=len(card.classes) or None, checkpoint_dir=out / "checkpoint",
                      noise_fn=task.training_noise(card, dev), x0_loss=task.training_loss(card))
    resumed = resume and trainer.resume()
    batches = random_batches(training_cases, spatial_dims=card.spatial_dims, patch=card.patch,
                             batch_size=config.batch_size, seed=config.seed * 7919 + trainer.rank + trainer.step,
                             focus_fraction=float(card.training.get("oversample", 0.0)),
                             augment=task.augment(card))
    progress.start("train", config.max_steps, done=trainer.step)
    trainer.fit(batches, on_step=lambda i, n, loss: progress.advance(loss=f"{loss:.4f}"), cancel=progress.cancel)
    progress.close()
    wall = trainer.seconds      # with a resumed run, the time of the runs before it too
    runs: list[dict[str, Any]] = []
    if resumed and (out / "model.json").is_file():     # the earlier runs' commands
        earlier = read_card(out).training
        runs = earlier.get("runs") or [_run_record(earlier)]
    card.training = {
        **card.training,   # task-specific training settings (noise range, variant, oversampling)
        "data": settings.get("data", str(Path(data))), "cases": [c.id for c in cases], "config": config.to_dict(),
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


def _base(task_name: str, model: str | Path, out: str | Path) -> tuple[ModelCard, torch.nn.Module]:
    """The base model of a fine-tuning run, checked: of the task, and not written over by `out`."""
    folder = resolve_model(model)
    if Path(out).resolve() == folder.resolve():
        raise DiffusionMICError(f"--out '{out}' is the base model's own folder; choose another")
    card, network = load_model(folder)
    if card.task != task_name:
        raise DiffusionMICError(f"model '{card.name}' is a {card.task} model, not a {task_name} model")
    return card, network


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
    card, network = _base(task_name, model, out)
    settings = dict(settings or {})
    lr = FINETUNE_LR["lora" if lora_rank else "full"]
    settings["train"] = {**FINETUNE_TRAIN, "lr": lr, **settings.get("train", {})}
    settings.setdefault("name", f"{card.name}-finetuned")
    return train(task_name, data, out, settings=settings, max_steps=max_steps, device=device, progress=progress,
                 resume=resume, base=(card, network), lora_rank=lora_rank)


# Adapting to one scan: short, on that scan alone (measured on the bundled denoiser: see the README).
ADAPT_STEPS = 200


def adapt(task_name: str, model: str | Path, scan: str | Path | Volume, out: str | Path, *, steps: int = ADAPT_STEPS,
          lora_rank: int = 8, sigma: float | None = None, alpha: float = 0.5, device: str = "auto",
          progress: Progress | None = None) -> ModelCard:
    """Fine-tune a denoiser on one noisy scan without its clean version (Recorrupted-to-Recorrupted,
    tasks.denoise), with rank-`lora_rank` adapters merged afterwards. `sigma`: the scan's noise
    standard deviation in its own units (default: estimated). The base model is left as it was."""
    if task_name != "denoise":
        raise DiffusionMICError(f"only denoise models adapt to a scan without a reference, not {task_name}")
    if steps < 1 or not 0 < alpha <= 1 or (sigma is not None and sigma <= 0):
        raise DiffusionMICError(f"adapt needs steps >= 1, 0 < alpha <= 1 and sigma > 0 "
                                f"(got {steps}, {alpha}, {sigma})")
    card, network = _base(task_name, model, out)
    volume = scan if isinstance(scan, Volume) else read_volume(scan)
    card.training = {**card.training, "channels": ["scan"], "noise_range": None,
                     "self_supervised": {"method": "recorrupted-to-recorrupted", "alpha": alpha, "sigma": sigma}}
    settings = {"name": f"{card.name}-adapted", "data": str(scan) if not isinstance(scan, Volume) else "a volume",
                "command": f"adapt {task_name} (Recorrupted-to-Recorrupted, {steps} steps)",
                "train": {**FINETUNE_TRAIN, "lr": FINETUNE_LR["lora" if lora_rank else "full"], "max_steps": steps}}
    with tempfile.TemporaryDirectory(prefix="diffusion-mic-adapt-") as tmp:
        data = Path(tmp)
        (data / "imagesTr").mkdir()
        write_volume(volume, data / "imagesTr" / "scan_0000.nii.gz")
        (data / "dataset.json").write_text(json.dumps({"channel_names": {"0": "scan"}, "labels": {"background": 0},
                                                       "numTraining": 1, "file_ending": ".nii.gz"}), encoding="utf-8")
        return train(task_name, data, out, settings=settings, device=device, progress=progress, resume=False,
                     base=(card, network), lora_rank=lora_rank)
