"""Speed against the peer path (`diffusion-mic study speed`): for denoising and modality
conversion (T1 + T2 -> FLAIR), the same UNet trained with DiffusionMIC's recipe (x0 prediction,
Fast-DDPM) and with MONAI's standard recipe (epsilon prediction over a 1000-step linear schedule,
the training loss through `monai.inferers.DiffusionInferer`), for the same budget; then quality
and wall time per 2 mm volume of every sampler and step count (DPM++ 2M, DDIM, UniPC at 1, 2, 4,
10, 20, 50 steps) against the peer path itself: `DiffusionInferer.sample` with
MONAI's `DDPMScheduler` over all 1000 steps. All rows in one run, on the same held-out slices."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import DDPMScheduler

from .. import api
from ..engine.inference import bounding_box
from ..engine.pipeline import train
from ..engine.sampling import foreground_crop
from ..engine.trainer import Batch, Trainer
from ..models import load_model, read_card
from ..progress import Progress
from ..tasks import RunOptions, get_task
from ..tasks.translate import input_mask
from ..volume import Volume
from . import denoise as denoise_study
from . import translate as translate_study
from .core import Context, Evaluation, Method, budget_used
from .denoise import _largest_slice, rician, slab
from .learners import one_step_card

TASK = "speed"
CHANNELS = ["T1", "T2", "FLAIR"]
SUBTASKS = ("denoise", "translate")
SAMPLERS = {"dpm++2m": "DPM++ 2M", "ddim": "DDIM", "unipc": "UniPC"}
STEPS = (1, 2, 4, 10, 20, 50)
PEER_STEPS = 1000
NOISE = 5.0
SLAB = {True: 1, False: 16}      # slices timed and measured (quick, full); the time is scaled to the volume
COLUMNS = [("psnr", "PSNR (dB)", "higher"), ("ssim", "SSIM", "higher"),
           ("speedup", "× faster than the MONAI path", "higher")]
NOTES = [
    "One held-out phantom subject (2 mm): denoising its clean T1 with 5 % Rician noise added (reference: the clean T1); "
    "T1 + T2 (acquired) -> FLAIR (reference: the clean FLAIR). PSNR and SSIM inside the brain, as in the denoise "
    "and translate studies.",
    "Time: every row is run on the same slab of axial slices through the largest brain slice (1 in a quick "
    "study, 16 in the full one), timed, and scaled to the whole volume by the ratio of the slices the task's "
    "pipeline processes (its foreground box) in the volume and in the slab: an extrapolation, not a timed "
    "whole volume. Same device, one run, model loading included; that per-run overhead is scaled too, which "
    "overstates the time of the few-step rows (and understates their speed-up).",
    "Both recipes train the same network config on the same batches (the task's crops and augmentation) with the "
    "same optimiser, EMA and budget; only the prediction target and the timesteps differ. DiffusionMIC: x0 "
    "prediction on the 4 Fast-DDPM timesteps of its default 4-step sampler. MONAI: epsilon prediction on all "
    "1000 timesteps, noised and called by DiffusionInferer.",
    "The MONAI path samples with DiffusionInferer.sample and MONAI's DDPMScheduler with its defaults (linear betas "
    "1e-4 to 0.02, 1000 steps, the x0 estimate clipped to [-1, 1]: without the clipping this network's samples "
    "diverged, 1.7 dB PSNR against 10.7 dB with it on a 2-slice check) inside the task's own pipeline "
    "(normalisation, crop, post-processing), so only the sampler differs. The other MONAI-recipe rows sample "
    "that same epsilon network with the DiffusionMIC (diffusers) samplers.",
    "Speed-up: the MONAI path's seconds per volume over the row's.",
    "DiffusionMIC's recipe trains only on the timesteps of its default 4-step sampler (Fast-DDPM), so its model "
    "runs 1, 2 and 4 steps and refuses more; the MONAI recipe's runs every step count.",
]
BASE = {"denoise": (denoise_study.RECIPE, denoise_study.QUICK_NETWORK, {}),
        "translate": (translate_study.RECIPE, translate_study.QUICK_NETWORK,
                      {"task": {"inputs": ["T1", "T2"], "output": "FLAIR"}})}
MONAI_RECIPE = {"schedule": {"prediction_type": "epsilon", "train_steps": None},
                "sampler": {"name": "ddpm", "steps": PEER_STEPS}}


def settings(ctx: Context, sub: str, recipe: str) -> dict[str, Any]:
    """The study recipe of `sub` (DiffusionMIC's), or the same with MONAI's schedule and prediction."""
    base, quick_network, extra = BASE[sub]
    b = ctx.budget
    s = {**base, **extra, "train": {**base["train"], "max_steps": b.steps, "batch_size": b.batch_size,
                                    "time_limit_s": b.time_limit_s},
         "cases": ctx.data.train_ids, "command": f"diffusion-mic study speed{' --quick' if ctx.quick else ''}"}
    if ctx.quick:
        s["network"] = quick_network
    return {**s, **MONAI_RECIPE} if recipe == "monai" else s


class MonaiRecipeTrainer(Trainer):
    """MONAI's standard training step: epsilon prediction at a uniformly drawn timestep of all
    1000, the noisy image made and the network called by DiffusionInferer (conditioning by
    concatenation). Everything else is the engine's trainer."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.inferer = DiffusionInferer(DDPMScheduler(num_train_timesteps=self.schedule.num_train_timesteps))

    def loss(self, batch: Batch) -> torch.Tensor:
        x0 = batch.target.to(self.device)
        noise = torch.randn(x0.shape, generator=self.generator).to(self.device)
        t = torch.randint(0, self.schedule.num_train_timesteps, (x0.shape[0],), generator=self.generator).to(self.device)
        pred = self.inferer(inputs=x0, diffusion_model=self.model, noise=noise, timesteps=t,
                            condition=batch.cond.to(self.device), mode="concat")
        return torch.nn.functional.mse_loss(pred.float(), noise)


class MonaiPath(torch.nn.Module):
    """The peer path in the diffusion network's place (as learners.AsX0): given the conditioning,
    MONAI's DiffusionInferer.sample runs the epsilon network over all 1000 DDPMScheduler steps;
    with a one-step DDIM x0 sampler around it, its result is the output."""

    def __init__(self, net: torch.nn.Module, out_channels: int, seed: int = 0):
        super().__init__()
        self.net, self.out, self.seed = net, out_channels, seed

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        scheduler = DDPMScheduler(num_train_timesteps=PEER_STEPS)      # MONAI's defaults: x0 clipped to [-1, 1]
        scheduler.set_timesteps(PEER_STEPS)
        noise = torch.randn(x[:, :self.out].shape, generator=torch.Generator().manual_seed(self.seed)).to(x.device)
        torch.manual_seed(self.seed)     # DDPMScheduler.step draws its variance noise from the global generator
        return DiffusionInferer(scheduler).sample(noise, self.net, scheduler, conditioning=x[:, self.out:],
                                                  mode="concat", verbose=False)


# ---- the test slices (the same for every row) -----------------------------------------------------

def test_item(ctx: Context, sub: str) -> dict[str, Any]:
    """The first held-out subject's slab: inputs, reference, brain mask, and the slice ratio."""
    key = ("item", sub)
    if key in ctx.cache:
        return ctx.cache[key]
    case = ctx.data.test[0]
    labels = case.read_label()
    brain = labels.with_array((labels.array > 0).astype(np.uint8))
    depth = SLAB[ctx.quick]
    if sub == "denoise":
        clean = case.read("T1", "cleanTr")
        reference, mask = slab(clean, brain, depth)
        volumes = [reference.with_array(rician(reference.array, NOISE, seed=0))]
        whole = foreground_crop(rician(clean.array, NOISE, seed=0)[None])[0]
        part = foreground_crop(volumes[0].array[None])[0]
    else:
        full = [case.read(ch) for ch in ("T1", "T2")]
        volumes = [slab(v, brain, depth)[0] for v in full]
        reference, mask = slab(case.read("FLAIR", "cleanTr"), brain, depth)
        whole = bounding_box(input_mask(np.stack([v.array for v in full])))[0]
        part = bounding_box(input_mask(np.stack([v.array for v in volumes])))[0]
    item = {"volumes": volumes, "reference": reference, "mask": mask, "case": case.id,
            "volume_slices": whole.stop - whole.start, "slab_slices": part.stop - part.start}
    ctx.cache[key] = item
    return item


def write_reference(ctx: Context) -> None:
    refs = {}
    for sub in SUBTASKS:
        item = test_item(ctx, sub)
        z = _largest_slice(item["mask"].array)
        refs[sub] = item["reference"].array[z]
        refs[f"{sub} input"] = item["volumes"][0].array[z]
    ctx.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(ctx.out / "reference.npz", **refs)


# ---- rows ---------------------------------------------------------------------------------------

def model_dir(ctx: Context, sub: str, recipe: str) -> Path:
    return ctx.out / "models" / f"{sub}-{recipe}"


def _fit(sub: str, recipe: str) -> Callable[[Context, Path], dict[str, Any]]:
    """Train the recipe's model once (every row of the recipe shares it)."""
    def fit(ctx: Context, folder: Path) -> dict[str, Any]:
        where = model_dir(ctx, sub, recipe)
        if not (where / "model.json").is_file():
            train(sub, ctx.data.train_dir, where, settings=settings(ctx, sub, recipe), device=str(ctx.device),
                  progress=ctx.progress, resume=True,
                  trainer_cls=MonaiRecipeTrainer if recipe == "monai" else Trainer)
        return {**budget_used(read_card(where).training), "model": str(where)}
    return fit


def _peer_run(ctx: Context, sub: str, volumes: list[Volume]) -> Volume:
    card, net = load_model(model_dir(ctx, sub, "monai"), ctx.device)
    c = one_step_card(card)
    options = RunOptions(device=str(ctx.device)).with_card_defaults(c)
    with torch.inference_mode():
        return get_task(sub).run(c, MonaiPath(net, card.network["out_channels"]), volumes, options, Progress(),
                                 ctx.device).outputs["output"]


def _peer_seconds(ctx: Context, sub: str) -> float | None:
    done = ctx.out / row_name(sub, "monai", "ddpm", PEER_STEPS) / "result.json"
    return json.loads(done.read_text(encoding="utf-8")).get("seconds_per_volume") if done.is_file() else None


def headline_table(sub: str) -> str:
    return f"{sub}: DiffusionMIC default vs MONAI path"


def sweep_table(sub: str, recipe: str) -> str:
    return f"{sub}: {'DiffusionMIC recipe (x0, Fast-DDPM)' if recipe == 'dmic' else 'MONAI recipe (epsilon, 1000 steps)'}"


def _evaluate(sub: str, recipe: str, sampler: str, steps: int, headline: bool) -> Callable[[Context, Path], Evaluation]:
    def evaluate(ctx: Context, folder: Path) -> Evaluation:
        item = test_item(ctx, sub)
        t0 = time.perf_counter()
        if recipe == "monai" and sampler == "ddpm":
            out = _peer_run(ctx, sub, item["volumes"])
        else:
            fn = api.denoise if sub == "denoise" else api.translate
            out = fn(item["volumes"], model_dir(ctx, sub, recipe), sampler=sampler, steps=steps,
                     device=str(ctx.device)).outputs["output"]
        measured = time.perf_counter() - t0
        seconds = measured * item["volume_slices"] / item["slab_slices"]
        m = get_task(sub).evaluate(out, item["reference"], item["mask"])
        peer = seconds if recipe == "monai" and sampler == "ddpm" else _peer_seconds(ctx, sub)
        row = {"psnr": float(m["psnr"]), "ssim": float(m["ssim"]), "speedup": peer / seconds if peer else None}
        tables = {headline_table(sub): row} if headline else {}      # the headline table comes first
        tables[sweep_table(sub, recipe)] = row
        previews = {}
        if headline:
            z = _largest_slice(item["mask"].array)
            previews = {sub: out.array[z], f"{sub} error": np.abs(out.array[z] - item["reference"].array[z])}
        return Evaluation(tables, seconds, previews,
                          {"measured_s": measured, "slab_slices": item["slab_slices"],
                           "volume_slices": item["volume_slices"], "sampler": sampler, "steps": steps,
                           "case": item["case"]})
    return evaluate


def row_name(sub: str, recipe: str, sampler: str, steps: int) -> str:
    return f"{sub}-{recipe}-{sampler}-{steps}"


def sweep_steps(sub: str, recipe: str) -> tuple[int, ...]:
    """The step counts a recipe's model can take: DiffusionMIC's trains only on its default
    sampler's Fast-DDPM timesteps (and refuses more steps); MONAI's on all 1000."""
    trained = BASE[sub][0]["schedule"]["train_steps"] if recipe == "dmic" else PEER_STEPS
    return tuple(n for n in STEPS if n <= trained)


def methods(quick: bool) -> list[Method]:
    rows = []
    for sub in SUBTASKS:
        default = (BASE[sub][0]["sampler"]["name"], BASE[sub][0]["sampler"]["steps"])
        rows.append(Method(row_name(sub, "monai", "ddpm", PEER_STEPS),
                           f"MONAI path: DiffusionInferer.sample, DDPMScheduler {PEER_STEPS} steps", "peer",
                           _evaluate(sub, "monai", "ddpm", PEER_STEPS, True), _fit(sub, "monai")))
        for recipe in ("dmic", "monai"):
            name = "DiffusionMIC" if recipe == "dmic" else "MONAI"
            for sampler, label in SAMPLERS.items():
                for steps in sweep_steps(sub, recipe):
                    is_default = recipe == "dmic" and (sampler, steps) == default
                    rows.append(Method(row_name(sub, recipe, sampler, steps),
                                       f"{name} recipe, {label} {steps} steps" + (" (its default)" if is_default else ""),
                                       "diffusion" if recipe == "dmic" else "peer",
                                       _evaluate(sub, recipe, sampler, steps, is_default), _fit(sub, recipe)))
    return rows
