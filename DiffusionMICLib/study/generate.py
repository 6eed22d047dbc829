"""Generation study (the survey's Table 9): the 3D diffusion generator (the task's own recipe,
healthy/lesion classes) against a VAE (MONAI VarAutoEncoder decoding N(0, I) latents) and a GAN
(MONAI Generator + PatchDiscriminator), on the same grid and channels (T1 + FLAIR)."""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .. import api
from ..engine.batches import TrainingCase
from ..engine.latent import RECORD, WEIGHTS
from ..engine.pipeline import train
from ..engine.space import from_unit, robust_scale, to_unit
from ..errors import DiffusionMICError
from ..metrics import bright_tail_fractions, generation_metrics, image_metrics
from ..models import ModelCard, load_model, read_card, resolve_model
from ..progress import Progress
from ..tasks import RunOptions, get_task
from ..tasks.generate import NORMALISATION, onto_grid, sample_key
from ..volume import Geometry, Volume
from .adversarial import AdversarialTrainer, VAETrainer
from .core import Context, Evaluation, Method, budget_used, bundled_note
from .learners import fit_supervised, load_baseline, one_step_card

TASK = "generate"
CHANNELS = ["T1", "FLAIR"]
BUNDLED = "brain-mri-generate"
COLUMNS = [("nmae", "NMAE", "lower"), ("psnr", "PSNR (dB)", "higher"), ("ssim", "SSIM", "higher"),
           ("fraction_error", "tissue-fraction error", "lower"), ("mmd", "MMD", "lower"),
           ("diversity_gap", "MS-SSIM gap to real pairs", "lower"), ("sharpness", "edge sharpness (× real)", None),
           ("bright_tail_gap", "bright-tail gap to real lesions (‰)", "lower")]
NOTES = [
    "One table per generated channel. NMAE, PSNR and SSIM: each sample against its nearest held-out real "
    "subject (the one with the lowest NMAE over both channels), the real subject's clean image brought onto the "
    "sample's grid (Gaussian pre-filter, linear) and both divided by their 99.5th foreground percentile; inside "
    "that subject's brain (label > 0); mean over the samples.",
    "Distribution measures (metrics.generation_metrics, no downloaded network): tissue-fraction error = mean "
    "absolute difference of the 3-class 1D k-means fractions of the foreground (samples vs held-out reals); MMD "
    "(MONAI, linear kernel) on histogram (32 bins) + 4×4×4 layout features of the foreground, not on a learned "
    "network's features (needs at least two samples and two reals); MS-SSIM gap: the absolute difference between "
    "the samples' mean pairwise MS-SSIM and the same among the real subjects (needs two reals).",
    "Bright tail (FLAIR only): the fraction of foreground voxels above the 99.9th percentile of the held-out "
    "subjects' lesion-free FLAIR (healthyTr), per mille; the gap: its absolute difference to the real lesion "
    "subjects' fraction. The diffusion rows count their lesion-condition samples; the VAE and GAN are "
    "unconditional, so all their samples count.",
    "Samples: half healthy, half lesion condition for diffusion (guidance 1); the VAE and GAN decode N(0, I) "
    "latents drawn from each sample's seed. All run through the generate task's pipeline (grid, scaling).",
    "Latent rows' result.json also hold `autoencoder_round_trip`: the held-out subjects encoded and decoded by "
    "the model's autoencoder, measured as samples are (the most its samples can keep).",
    "VAE: MONAI VarAutoEncoder, negative ELBO with a Gaussian decoder (sigma 0.1 in [-1, 1] units). GAN: MONAI "
    "Generator with a tanh output (as DCGAN; without it the first run's samples left the intensity range: NMAE "
    "1.02) + PatchDiscriminator, least-squares PatchAdversarialLoss. Both as deep as the diffusion UNet.",
]

# The recipe of the bundled brain-mri-generate (Resources/Models/brain-mri-generate/train.json),
# with the study's budget instead of its 3900 steps of batch 2.
RECIPE: dict[str, Any] = {
    "task": {"channels": ["T1", "FLAIR"], "classes": "lesion", "variant": "cleanTr", "spacing": [4.0, 4.0, 4.0]},
    "network": {"channels": [16, 32, 64], "norm_num_groups": 16},
    "schedule": {"prediction_type": "sample", "train_steps": 10},
    "sampler": {"name": "dpm++2m", "steps": 10},
    "train": {"lr": 1e-3, "lr_schedule": "cosine", "ema_decay": 0.99, "ema_start": 20, "seed": 104},
}
QUICK = {"task": {**RECIPE["task"], "spacing": [8.0, 8.0, 8.0]},
         "network": {"channels": [16, 32], "norm_num_groups": 16}}


def samples_per_method(ctx: Context) -> int:
    return 2 if ctx.quick else 8


def recipe(ctx: Context) -> dict[str, Any]:
    b = ctx.budget
    settings = {**RECIPE, **(QUICK if ctx.quick else {}),
                "train": {**RECIPE["train"], "max_steps": b.steps, "batch_size": b.batch_size,
                          "time_limit_s": b.time_limit_s},
                "cases": ctx.data.train_ids, "command": f"diffusion-mic study generate{' --quick' if ctx.quick else ''}"}
    return settings


# Latent diffusion (engine/latent.py) at 2 mm: the same UNet and schedule as RECIPE over the latents
# of an AutoencoderKL (4x down, 4 latent channels as MAISI: a 2 mm volume's latent is about the size
# of the 4 mm image), which gets the study's step count at batch 4 of 32^3 crops (0.6 s a step here,
# against about 8 s for MONAI's tutorial network on 48^3 crops), a third of them centred on each
# channel's brightest voxels. Measured on the first autoencoder (3 channels, batch 2, no
# oversampling): its round trip of the held-out subjects kept their diversity (MS-SSIM 0.82 vs
# 0.81) but lost every lesion (bright tail 0 vs 3.2 per mille) and FLAIR's grey/white contrast.
LATENT = {"task": {**RECIPE["task"], "spacing": [2.0, 2.0, 2.0]},
          "autoencoder": {"network": {"channels": [16, 32, 32], "latent_channels": 4}, "patch": [32, 32, 32],
                          "oversample": 1 / 3, "discriminator": {"channels": 16, "num_layers_d": 3}}}
QUICK_LATENT = {"task": {**RECIPE["task"], "spacing": [8.0, 8.0, 8.0]},
                "autoencoder": {"network": {"channels": [16, 16]}, "patch": [16, 16, 16],
                                "discriminator": {"channels": 8, "num_layers_d": 2}}}


# The same latent model with the UNet of MONAI's brain LDM tutorial's schedule instead of x0 and
# 10 Fast-DDPM steps (whose samples came out too alike: pairwise MS-SSIM 0.92 against 0.79 for
# real pairs; in latent space their spread was two thirds of the training latents').
LATENT_V = {"schedule": {"prediction_type": "v_prediction", "beta_schedule": "scaled_linear", "beta_start": 0.0015,
                         "beta_end": 0.0195, "train_steps": None},
            "sampler": {"name": "dpm++2m", "steps": 25}}


# The autoencoder is the latent rows' bottleneck: after the study's 1500 steps its round trip of the
# held-out subjects keeps none of their lesions and 0.60-0.67 of their sharpness. The
# diffusion-latent-long row gives it LONG_AE times the budget (continuing the diffusion-latent row's
# autoencoder from its checkpoint when there is one) and then trains diffusion-latent-v's UNet.
LONG_AE = 4


# No row drew lesions: they are 0.3 % of the latent voxels, so the UNet's loss is anatomy. The
# diffusion-latent-lesion row weights the loss LESION_WEIGHT + 1 on the latent voxels over each
# training subject's lesions (in its lesion example and its healthy twin), which gives them about
# an eighth of the loss; it reuses the diffusion-latent-long row's autoencoder.
LESION_WEIGHT = 50.0
# After the study's 1500 steps the v UNets draw brains filled with round blobs, no ventricles (the
# figure; sharpness and diversity read as met, MMD does not). The diffusion-latent-lesion-long row
# continues the diffusion-latent-lesion row's UNet to LONG_UNET times the steps.
LONG_UNET = 3


# Neither row drew lesions, for two measured reasons. The class, added to the time embedding, barely
# acts at a lesion (a noised held-out lesion latent keeps 0.31-0.62 of its lesion told "healthy",
# 0.33-0.66 told "lesion"); and the long autoencoder's round trip keeps a quarter of the real
# lesions' bright tail (0.84 against 3.18 per mille). The diffusion-latent-lesion-map row gives the
# UNet the lesion map as an input channel (tasks/lesion_maps.py), started from the
# diffusion-latent-lesion-long row's UNet with that channel's weights at zero, and continues the
# long autoencoder MAP_AE_STEPS x the study's steps with its L1 weighted MAP_WEIGHT + 1 on lesions
# (measured: 800 steps at weight 10 / 30 kept 0.51 / 0.75 of the bright tail, healthy twins at
# 0.9 / 0.8 of real healthy, sharpness 0.78 from 0.77); the UNet's loss has the same weight.
# Its samples use guidance MAP_GUIDANCE against a healthy sample on an empty map (tasks/generate.py),
# chosen on the validation subjects as the smallest of 1, 1.5, 2 whose lesion samples reach half
# the real lesion subjects' bright tail (4 samples each: 0.95, 1.77, 3.32 per mille against 5.0).
MAP_WEIGHT = 30.0
MAP_AE_STEPS = 0.5
MAP_GUIDANCE = 2.0
LESION_MAP_MODEL = "brain-mri-generate-2mm"    # the row's model is bundled under this name
LARGE_MODEL = "brain-mri-generate-2mm-large"   # and the large row's under this one


# The lesion-map row's samples are smoother than real subjects (every sample's edge sharpness 0.027
# per mm, real subjects 0.034-0.047) and more alike (pairwise MS-SSIM 0.85 against 0.79), and no
# sampler setting closes that: its UNet (16-32-64, one block, no attention) draws one level of
# detail. The diffusion-latent-large row trains a UNet twice as wide with attention at its deepest
# level (7.2 M parameters against 1.8 M; a training step costs about 3x) from scratch over that
# row's autoencoder (the row's folder, else the bundled model, which is that row's), with the same
# task settings, LARGE_UNET x the study's steps at half the learning rate (twice the width; not
# tuned): about 1.7 h on 2 cores (100 min on 2026-12-03), sized to finish within one working session, because a checkpoint
# on a session's disk (git-ignored) does not reach the next session's machine. A run stops at its
# time limit and the next run of the same command continues from the checkpoint.
LARGE_NETWORK = {"channels": [32, 64, 128], "attention_levels": [False, False, True], "norm_num_groups": 16}
QUICK_LARGE_NETWORK = {"channels": [32, 64], "attention_levels": [False, True], "norm_num_groups": 16}
LARGE_UNET = 4 / 3                 # 2000 steps of batch 8
LARGE_RUN_LIMIT = 4                # a run stops after 4x the study's safety stop (2 h)
LARGE_TRAIN = {"lr": 5e-4, "ema_decay": 0.995, "ema_start": 100, "seed": 105, "checkpoint_every": 100}
# Its samples come out sharper with more solver steps. Measured on this row's 8 samples (T1 / FLAIR
# edge sharpness x real): DPM++ 2M 25 steps 0.672 / 0.695; 50 steps 0.684 / 0.703; 100 steps
# 0.688 / 0.708; UniPC 50 as DPM++ 50; DDPM 50 0.651 / 0.677; the other measures moved by at most
# 0.002 (the bright tail by 0.1 per mille). 50 steps: most of the gain, at 30 s a volume (25: 15 s).
LARGE_SAMPLER = {"name": "dpm++2m", "steps": 50}


def latent_recipe(ctx: Context, unet: dict[str, Any] | None = None, ae_scale: float = 1,
                  task: dict[str, Any] | None = None) -> dict[str, Any]:
    b = ctx.budget
    base = {**recipe(ctx), **(unet or {})}
    spec = QUICK_LATENT if ctx.quick else LATENT
    ae = spec["autoencoder"]
    return {**base, "task": {**spec["task"], **(task or {})},
            "autoencoder": {**ae, "adversarial_start": b.steps // 3,
                            "train": {"max_steps": round(b.steps * ae_scale), "batch_size": 2 if ctx.quick else 4,
                                      "lr": 1e-3 if ctx.quick else 1e-4, "time_limit_s": b.time_limit_s * ae_scale,
                                      "checkpoint_every": 100}}}


def card(ctx: Context) -> ModelCard:
    return get_task(TASK).make_card(ctx.data.train, recipe(ctx))


def training_cases(ctx: Context, c: ModelCard) -> list[TrainingCase]:
    if "cases" not in ctx.cache:
        ctx.cache["cases"] = get_task(TASK).training_cases(c, ctx.data.train, ctx.data.train_cases)
    return ctx.cache["cases"]


# ---- evaluation ---------------------------------------------------------------------------------

Sample = dict[str, Volume]       # channel -> volume on the model's grid, normalised scale


def _reals(ctx: Context) -> list[dict[str, Any]]:
    """Each held-out subject: its clean channels, lesion-free FLAIR and brain mask (2 mm)."""
    if "reals" not in ctx.cache:
        reals = []
        for case in ctx.data.test:
            labels = case.read_label()
            reals.append({"id": case.id, "clean": {ch: case.read(ch, "cleanTr") for ch in CHANNELS},
                          "healthy": case.read("FLAIR", "healthyTr") if "FLAIR" in case.variants.get("healthyTr", {})
                          else None,
                          "brain": labels.with_array((labels.array > 0).astype(np.float32))})
        ctx.cache["reals"] = reals
    return ctx.cache["reals"]


def _on_grid(ctx: Context, grid: Geometry) -> list[dict[str, Volume]]:
    """The held-out subjects normalised and brought onto a sample grid (cached per grid)."""
    key = ("on-grid", grid.size, grid.spacing)
    if key not in ctx.cache:
        out = []
        for r in _reals(ctx):
            d = {ch: Volume(onto_grid(v.with_array(v.array.astype(np.float32) / robust_scale(v.array, NORMALISATION)),
                                      grid), grid) for ch, v in r["clean"].items()}
            d["brain"] = Volume((onto_grid(r["brain"], grid) > 0.5).astype(np.uint8), grid)
            out.append(d)
        ctx.cache[key] = out
    return ctx.cache[key]


def _nearest(ctx: Context, sample: Sample) -> tuple[int, dict[str, dict[str, float]]]:
    """The held-out subject nearest to a sample (lowest NMAE over the channels) and the metrics."""
    grid = next(iter(sample.values())).geometry
    scores = []
    for real in _on_grid(ctx, grid):
        scores.append({ch: image_metrics(sample[ch], real[ch], real["brain"]) for ch in CHANNELS})
    best = int(np.argmin([np.mean([m[ch]["nmae"] for ch in CHANNELS]) for m in scores]))
    return best, scores[best]


def _bright_tail(ctx: Context, ch: str, name: str, volumes: list[Volume]) -> dict[str, Any] | None:
    """FLAIR voxels above the healthy held-out subjects' 99.9th percentile: fractions for `volumes`
    (as `name`) and the real lesion subjects; None for other channels or without healthy subjects."""
    reals = _reals(ctx)
    if ch != "FLAIR" or any(r["healthy"] is None for r in reals):
        return None
    return bright_tail_fractions({name: volumes, "real lesion": [r["clean"][ch] for r in reals]},
                                 [r["healthy"] for r in reals])


def _evaluate(ctx: Context, draw: Callable[[], list[tuple[str | None, Sample]]]) -> Evaluation:
    """`draw()` returns (condition, sample) pairs; every sample is measured against the held-out reals."""
    t0 = time.perf_counter()
    drawn = draw()
    seconds = (time.perf_counter() - t0) / len(drawn)
    reals = _reals(ctx)
    tables, extra, previews = {}, {"per_channel": {}}, {}
    nearest = [_nearest(ctx, s) for _, s in drawn]
    for ch in CHANNELS:
        samples = [s[ch] for _, s in drawn]
        g = generation_metrics(samples, [r["clean"][ch] for r in reals])
        fractions = np.abs(np.subtract(g["tissue_fractions"]["samples"], g["tissue_fractions"]["reals"]))
        d = g["diversity"]
        row: dict[str, float | None] = {
            **{k: float(np.mean([m[ch][k] for _, m in nearest])) for k in ("nmae", "psnr", "ssim")},
            "fraction_error": float(np.mean(fractions)), "mmd": g["mmd"],
            "diversity_gap": (abs(d["samples_pairwise"] - d["reals_pairwise"])
                              if d["samples_pairwise"] is not None and d["reals_pairwise"] is not None else None),
            "sharpness": g["sharpness"]["ratio"], "bright_tail_gap": None}
        tail = _bright_tail(ctx, ch, "samples", [s[ch] for c, s in drawn if c in ("lesion", None)])
        if tail is not None:
            row["bright_tail_gap"] = 1000 * abs(tail["samples"] - tail["real lesion"])
            g["bright_tail"] = tail
        tables[f"{ctx.data.name}: {ch}"] = row
        extra["per_channel"][ch] = g
        first, (index, _) = drawn[0][1][ch], nearest[0]
        z = first.array.shape[0] // 2
        real = _on_grid(ctx, first.geometry)[index][ch]
        for k, (_, s) in enumerate(drawn[:2]):
            previews[f"{ch} sample {k + 1}"] = s[ch].array[z]
        previews[f"{ch} sample 1: error to nearest real"] = np.abs(first.array[z] - real.array[z])
    extra["nearest_real"] = [reals[i]["id"] for i, _ in nearest]
    extra["conditions"] = [c for c, _ in drawn]
    return Evaluation(tables, seconds, previews, extra)


def write_reference(ctx: Context) -> None:
    """The figure's first row: the first held-out subject on the study's grid."""
    grid = Geometry.from_dict(card(ctx).grid)
    real = _on_grid(ctx, grid)[0]
    z = grid.size[2] // 2
    refs = {}
    for ch in CHANNELS:
        refs[f"{ch} sample 1"] = real[ch].array[z]
    ctx.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(ctx.out / "reference.npz", **refs)


# ---- methods ----------------------------------------------------------------------------------

def _fit_diffusion(ctx: Context, folder: Path) -> dict[str, Any]:
    return budget_used(train(TASK, ctx.data.train_dir, folder / "model", settings=recipe(ctx), device=str(ctx.device),
                             progress=ctx.progress, resume=True).training)


def _fit_latent(ctx: Context, folder: Path, unet: dict[str, Any] | None = None, ae_scale: float = 1,
                task: dict[str, Any] | None = None, init: Path | None = None) -> dict[str, Any]:
    settings = latent_recipe(ctx, unet, ae_scale, task)
    if init is not None:
        settings["init"] = str(init)
    t = train(TASK, ctx.data.train_dir, folder / "model", settings=settings,
              device=str(ctx.device), progress=ctx.progress, resume=True)
    ae = t.latent["training"]
    return {**budget_used(t.training), "wall_time_s": round(t.training["wall_time_s"] + ae["wall_time_s"], 1),
            "autoencoder": {k: ae[k] for k in ("steps", "batch_size", "patch", "wall_time_s")}}


def _reuse_autoencoder(ctx: Context, row: str, folder: Path) -> bool:
    """Copy row's finished autoencoder into folder's model (once); whether folder has one now."""
    finished = ctx.out / row / "model" / "autoencoder"
    mine = folder / "model" / "autoencoder"
    if (finished / RECORD).is_file() and not (mine / RECORD).is_file():
        mine.mkdir(parents=True, exist_ok=True)
        for name in (WEIGHTS, RECORD):            # the record last: it marks the stage finished
            shutil.copy2(finished / name, mine / name)
    return (mine / RECORD).is_file()


def _fit_latent_v(ctx: Context, folder: Path) -> dict[str, Any]:
    """The UNet ablation: the finished autoencoder of the diffusion-latent row when there is one
    (copied: only the UNet's recipe differs), else its own, trained the same way."""
    _reuse_autoencoder(ctx, "diffusion-latent", folder)
    return _fit_latent(ctx, folder, LATENT_V)


def _fit_latent_long(ctx: Context, folder: Path) -> dict[str, Any]:
    """diffusion-latent-v's UNet over an autoencoder trained LONG_AE times as long."""
    finished = ctx.out / "diffusion-latent" / "model" / "autoencoder" / "checkpoint"
    mine = folder / "model" / "autoencoder" / "checkpoint"
    if finished.is_dir() and not mine.exists():
        shutil.copytree(finished, mine)
    return _fit_latent(ctx, folder, LATENT_V, ae_scale=LONG_AE)


def _fit_latent_lesion(ctx: Context, folder: Path) -> dict[str, Any]:
    """diffusion-latent-long's UNet recipe with the lesion-weighted loss, over that row's autoencoder."""
    if not _reuse_autoencoder(ctx, "diffusion-latent-long", folder):
        raise DiffusionMICError("diffusion-latent-lesion reuses the diffusion-latent-long row's autoencoder: "
                                "run that row first (--methods diffusion-latent-long)")
    return _fit_latent(ctx, folder, LATENT_V, ae_scale=LONG_AE, task={"lesion_weight": LESION_WEIGHT})


def _fit_latent_lesion_long(ctx: Context, folder: Path) -> dict[str, Any]:
    """diffusion-latent-lesion's UNet continued from that row's checkpoint to LONG_UNET times the steps
    (the cosine learning rate is a function of the step and the new total, so it rises again at the resume)."""
    finished = ctx.out / "diffusion-latent-lesion" / "model" / "checkpoint"
    mine = folder / "model" / "checkpoint"
    if not _reuse_autoencoder(ctx, "diffusion-latent-long", folder) or not finished.is_dir():
        raise DiffusionMICError("diffusion-latent-lesion-long continues the diffusion-latent-lesion row: run that "
                                "row first (--methods diffusion-latent-long,diffusion-latent-lesion)")
    if not mine.exists():
        shutil.copytree(finished, mine)
    b = ctx.budget
    unet = {**LATENT_V, "train": {**recipe(ctx)["train"], "max_steps": b.steps * LONG_UNET,
                                  "time_limit_s": b.time_limit_s * LONG_UNET}}
    return _fit_latent(ctx, folder, unet, ae_scale=LONG_AE, task={"lesion_weight": LESION_WEIGHT})


MAP_TASK = {"lesion_weight": MAP_WEIGHT, "lesion_map": True}    # the lesion-map rows' task settings


def _map_model(name: str, unet: str) -> dict[str, Any]:
    """A lesion-map row's UNet settings: LATENT_V's schedule and sampler, guidance MAP_GUIDANCE against
    healthy, and the name and description of the model it is bundled as (`unet`: words on its UNet)."""
    return {**LATENT_V, "defaults": {"guidance": MAP_GUIDANCE}, "name": name, "description": (
        f"Whole-brain T1 + FLAIR at 2 mm by latent diffusion (MONAI AutoencoderKL + DiffusionModelUNet{unet}, "
        "v-prediction), healthy or with lesions where a lesion mask, or one of the training subjects' lesion "
        "maps, puts them; trained on clean phantom subjects.")}


def _fit_latent_lesion_map(ctx: Context, folder: Path) -> dict[str, Any]:
    """A lesion-map UNet started from diffusion-latent-lesion-long's, over diffusion-latent-long's
    autoencoder continued with the lesion-weighted L1."""
    long_ae = ctx.out / "diffusion-latent-long" / "model" / "autoencoder" / "checkpoint"
    start = ctx.out / "diffusion-latent-lesion-long" / "model"
    if not long_ae.is_dir() or not (start / "model.json").is_file():
        raise DiffusionMICError("diffusion-latent-lesion-map continues the diffusion-latent-long row's autoencoder and "
                                "the diffusion-latent-lesion-long row's UNet: run those rows first (--methods "
                                "diffusion-latent-long,diffusion-latent-lesion,diffusion-latent-lesion-long)")
    mine = folder / "model" / "autoencoder" / "checkpoint"
    if not mine.exists():
        shutil.copytree(long_ae, mine)
    return _fit_latent(ctx, folder, _map_model(LESION_MAP_MODEL, ""), ae_scale=LONG_AE + MAP_AE_STEPS, task=MAP_TASK,
                       init=start)


def _fit_latent_large(ctx: Context, folder: Path) -> dict[str, Any]:
    """A larger UNet trained from scratch over the lesion-map row's autoencoder, in pieces."""
    row = ctx.out / "diffusion-latent-lesion-map" / "model"
    source = row if (row / "model.json").is_file() else None if ctx.quick else LESION_MAP_MODEL
    if source is None:
        raise DiffusionMICError("diffusion-latent-large reuses the diffusion-latent-lesion-map row's autoencoder: run "
                                "that row first (--methods diffusion-latent-lesion-map)")
    b = ctx.budget
    steps, limit = b.steps if ctx.quick else round(b.steps * LARGE_UNET), b.time_limit_s * LARGE_RUN_LIMIT
    unet = {**_map_model(LARGE_MODEL, " 32-64-128 with attention"),
            "network": QUICK_LARGE_NETWORK if ctx.quick else LARGE_NETWORK, "sampler": LARGE_SAMPLER,
            "train": {**recipe(ctx)["train"], **LARGE_TRAIN, "max_steps": steps, "time_limit_s": limit}}
    settings = {**latent_recipe(ctx, unet, task=MAP_TASK),
                "autoencoder": {"from": str(source)}, "half": True}    # 16-bit weights: the bundled copy
    t = train(TASK, ctx.data.train_dir, folder / "model", settings=settings, device=str(ctx.device),
              progress=ctx.progress, resume=True)
    if t.training["steps"] < steps:
        raise DiffusionMICError(f"diffusion-latent-large stopped at step {t.training['steps']} of {steps} (its time "
                                f"limit per run, {limit:.0f} s): run the same command again "
                                "to continue from its checkpoint")
    return {**budget_used(t.training), "autoencoder": t.latent["training"]["from"]}


def _diffusion_draws(ctx: Context, model: str | Path) -> Callable[[], list[tuple[str | None, Sample]]]:
    """Half the samples healthy, half lesion (seeds 0, 1, ... and 1000, 1001, ...)."""
    def draw() -> list[tuple[str | None, Sample]]:
        c = read_card(resolve_model(model))
        n = samples_per_method(ctx) // 2
        out = []
        for k, condition in enumerate(c.classes or [None]):
            run = api.generate(model, count=n, condition=condition, seed=1000 * k, device=str(ctx.device))
            out += [(condition, {ch: run.outputs[sample_key(i, j, ch)] for j, ch in enumerate(c.outputs)})
                    for i in range(n)]
        return out
    return draw


def _eval_diffusion(ctx: Context, folder: Path) -> Evaluation:
    return _evaluate(ctx, _diffusion_draws(ctx, folder / "model"))


def _round_trip(ctx: Context, model: Path) -> dict[str, Any]:
    """The latent model's ceiling: the held-out subjects through its autoencoder (encode, decode)
    measured as samples are (tissue fractions, diversity, sharpness, FLAIR bright tail)."""
    c, net = load_model(model, ctx.device)
    grid = Geometry.from_dict(c.grid)
    back: dict[str, list[Volume]] = {ch: [] for ch in CHANNELS}
    for real in _on_grid(ctx, grid):
        x = torch.from_numpy(np.stack([to_unit(real[ch].array, 1.0) for ch in c.outputs])[None]).to(ctx.device)
        with torch.inference_mode():
            y = net.decode(net.encode(x))[0].cpu().numpy()
        for j, ch in enumerate(c.outputs):
            back[ch].append(Volume(from_unit(y[j]), grid))
    reals = _reals(ctx)
    out: dict[str, Any] = {}
    for ch in CHANNELS:
        g = generation_metrics(back[ch], [r["clean"][ch] for r in reals])
        out[ch] = {"tissue_fractions": g["tissue_fractions"], "diversity": g["diversity"], "sharpness": g["sharpness"]}
        tail = _bright_tail(ctx, ch, "round trip", back[ch])
        if tail is not None:
            out[ch]["bright_tail"] = tail
    return out


def _eval_latent(ctx: Context, folder: Path) -> Evaluation:
    evaluation = _evaluate(ctx, _diffusion_draws(ctx, folder / "model"))
    evaluation.extra["autoencoder_round_trip"] = _round_trip(ctx, folder / "model")
    return evaluation


def _eval_bundled(ctx: Context, folder: Path) -> Evaluation:
    return _evaluate(ctx, _diffusion_draws(ctx, BUNDLED))


def _latent_size(ctx: Context) -> int:
    return 16 if ctx.quick else 128


def _vae_spec(ctx: Context, c: ModelCard) -> dict[str, Any]:
    levels = list(c.network["channels"])[:-1]         # as many 2x downsamplings as the diffusion UNet
    return {"spatial_dims": 3, "in_shape": [len(c.outputs), *c.patch], "out_channels": len(c.outputs),
            "latent_size": _latent_size(ctx), "channels": levels, "strides": [2] * len(levels), "use_sigmoid": False}


def _gan_spec(ctx: Context, c: ModelCard) -> dict[str, Any]:
    levels = list(c.network["channels"])[:-1]
    start = [s // 2 ** len(levels) for s in c.patch]
    return {"latent_shape": [_latent_size(ctx)], "start_shape": [levels[-1], *start],
            "channels": [*levels[::-1], len(c.outputs)], "strides": [2] * len(levels) + [1], "tanh": True}


def _fit_vae(ctx: Context, folder: Path) -> dict[str, Any]:
    c = card(ctx)
    return fit_supervised(ctx, folder, c, "var-autoencoder", _vae_spec(ctx, c), None, label="VAE",
                          trainer_cls=VAETrainer, cases=training_cases(ctx, c))


def _fit_gan(ctx: Context, folder: Path) -> dict[str, Any]:
    c = card(ctx)
    disc = {"spatial_dims": 3, "in_channels": len(c.outputs), "channels": 16, "num_layers_d": 2 if ctx.quick else 3}
    return fit_supervised(ctx, folder, c, "generator", _gan_spec(ctx, c), None, label="GAN",
                          trainer_cls=AdversarialTrainer, cases=training_cases(ctx, c), discriminator=disc,
                          latent_size=_latent_size(ctx))


class FromLatent(torch.nn.Module):
    """A trained decoder in the diffusion network's place (as learners.AsX0): its latent is the
    first `size` values of the sampler's initial noise, N(0, I) from the sample's own seed; with
    a one-step DDIM x0 sampler its output is the sample, on the card's grid."""

    def __init__(self, decode: Callable[[torch.Tensor], torch.Tensor], size: int):
        super().__init__()
        self.decode, self.size = decode, size

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(x.flatten(1)[:, :self.size])


def decoder(net: torch.nn.Module, kind: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if kind == "var-autoencoder":
        return lambda z: net.decode_forward(z, use_sigmoid=False)
    return net


def _eval_decoder(ctx: Context, folder: Path) -> Evaluation:
    net, meta = load_baseline(folder, ctx.device)
    c = one_step_card(card(ctx))
    wrapped = FromLatent(decoder(net, meta["kind"]), _latent_size(ctx))

    def draw() -> list[tuple[str | None, Sample]]:
        options = RunOptions(device=str(ctx.device), count=samples_per_method(ctx)).with_card_defaults(c)
        with torch.inference_mode():
            run = get_task(TASK).run(c, wrapped, [], options, Progress(), ctx.device)
        return [(None, {ch: run.outputs[sample_key(i, j, ch)] for j, ch in enumerate(c.outputs)})
                for i in range(options.count)]
    return _evaluate(ctx, draw)


def methods(quick: bool) -> list[Method]:
    return [
        Method("diffusion", "Diffusion, 3D (x0, 10 Fast-DDPM steps, healthy/lesion)", "diffusion", _eval_diffusion,
               _fit_diffusion),
        Method("diffusion-latent", "Latent diffusion, 3D at 2 mm (AutoencoderKL + the same UNet, healthy/lesion)",
               "diffusion", _eval_latent, _fit_latent,
               note="training: the autoencoder's steps (batch 4, 32^3 crops) + the UNet's; time: both"),
        Method("diffusion-latent-v", "Latent diffusion as above, v-prediction, 1000 timesteps, DPM++ 2M 25 steps",
               "diffusion", _eval_latent, _fit_latent_v,
               note="the same autoencoder as the row above; training: its steps + the UNet's; time: both"),
        Method("diffusion-latent-long", f"Latent diffusion v as above, autoencoder trained {LONG_AE}x as long",
               "diffusion", _eval_latent, _fit_latent_long,
               note=f"not budget-matched: the autoencoder gets {LONG_AE}x the study's steps; training: its steps + "
                    "the UNet's; time: both"),
        Method("diffusion-latent-lesion", f"Latent diffusion as above, loss weighted x{LESION_WEIGHT + 1:g} on lesions",
               "diffusion", _eval_latent, _fit_latent_lesion,
               note="not budget-matched: the diffusion-latent-long row's autoencoder; training: its steps + the "
                    "UNet's; time: both"),
        Method("diffusion-latent-lesion-long", f"Latent diffusion as above, UNet trained {LONG_UNET}x as long",
               "diffusion", _eval_latent, _fit_latent_lesion_long,
               note=f"not budget-matched: the row above's UNet continued to {LONG_UNET}x the study's steps; "
                    "training: its steps + the UNet's; time: both"),
        Method("diffusion-latent-lesion-map", "Latent diffusion as above + a lesion-map input channel",
               "diffusion", _eval_latent, _fit_latent_lesion_map,
               note=f"not budget-matched: started from the row above's UNet; its autoencoder continued "
                    f"{MAP_AE_STEPS:g}x the study's steps with the L1 weighted x{MAP_WEIGHT + 1:g} on lesions; lesion "
                    f"samples draw the training subjects' lesion maps, guidance {MAP_GUIDANCE:g} against healthy; "
                    "training: its steps + the UNet's; time: both"),
        Method("diffusion-latent-large", f"Latent diffusion as above, UNet 32-64-128 with attention, "
               f"DPM++ 2M {LARGE_SAMPLER['steps']} steps",
               "diffusion", _eval_latent, _fit_latent_large,
               note=f"not budget-matched: {LARGE_UNET:.3g}x the study's steps, trained from scratch over the row above's "
                    "autoencoder (not trained again); training: the UNet's steps and time"),
        Method("diffusion-bundled", f"Diffusion, bundled {BUNDLED}", "diffusion", _eval_bundled, note=bundled_note(BUNDLED, ", 4 mm grid")),
        Method("vae", "VAE (MONAI VarAutoEncoder, N(0, I) latents)", "learned", _eval_decoder, _fit_vae),
        Method("gan", "GAN (MONAI Generator + PatchDiscriminator)", "learned", _eval_decoder, _fit_gan),
    ]
