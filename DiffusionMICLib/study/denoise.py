"""Denoising study (the survey's Table 12): the diffusion denoiser (also adapted to each test scan
without its reference) against DnCNN and a UNet regression trained on the same pairs, non-local
means and BM4D, and the noisy input itself, at 1, 3, 5 and 9 % Rician noise, on held-out phantom
T1 and on real MR that ships in packages."""
from __future__ import annotations

import json
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .. import api
from ..engine.pipeline import ADAPT_STEPS, adapt, train
from ..engine.space import foreground
from ..metrics import image_metrics
from ..progress import Progress
from ..tasks import RunOptions, get_task
from ..volume import Volume
from .core import Context, Evaluation, Method, budget_recipe, budget_used, bundled_note, write_json
from .learners import AsX0, fit_supervised, load_baseline, one_step_card
from .realmr import real_mr, training_set_with_real

TASK = "denoise"
CHANNELS = ["T1"]
NOISE_LEVELS = (1.0, 3.0, 5.0, 9.0)
PREVIEW_NOISE = 5.0
COLUMNS = [("psnr", "PSNR (dB)", "higher"), ("psnr_gain", "Δ PSNR (dB)", "higher"), ("ssim", "SSIM", "higher"),
           ("rmse", "RMSE", "lower")]
NOTES = [
    "Noise: Rician, sigma = k % of the 99th percentile of the clean image's foreground (the bundled "
    "denoiser's training unit), drawn with a fixed seed per image and level; every method denoises the same noisy images.",
    "Phantom: held-out T1 (cleanTr) inside the brain (label > 0). Real MR: each image as shipped is the "
    "reference (its own acquisition noise stays), inside its Otsu foreground with holes filled.",
    "Real MR references keep their own acquisition noise; estimated by scikit-image's `estimate_sigma`, in % of "
    "the 99th percentile like the added noise: itk-t1 2.9 %, dipy-t1 0.9 %, dipy-b0 0.3 % (Immerkaer's estimator: "
    "4.2 %), pydicom-head 2.6 %. A perfect denoiser removes that noise too, so against the noisy input it would "
    "score about 20 log10(added / own): for a 2.6-2.9 % image about -9 dB at 1 %, +0.5 dB at 3 %, +5 dB at 5 % "
    "and +10 dB at 9 %. At 1-3 % the real-MR tables reward leaving noise in, not removing it.",
    "Learned methods see the same training pairs: the training subjects' clean T1/T2/PD/FLAIR with fresh "
    "Rician noise of 1-9 % per crop, two neighbouring slices on either side (2.5D; the 2D row: none), 48 x 48 crops.",
    "Crops varied in contrast and fine detail (the three rows so named): before the noise, each clean crop's [0, 1] "
    "intensities x -> 0.5 (x / 0.5)^g, g log-uniform in [0.5, 2] (real scans' fat and CSF reach 2-3 times the "
    "median, the phantom's 1.2), times 1 + a T, a uniform in [0, 0.2], T a unit Gaussian random field smoothed "
    "in-plane by 0.5-1.5 voxels and shared by the stacked neighbours (detail finer than the phantom's MNI152 "
    "anatomy, which the model must keep; noise is independent between slices).",
    "2D, crops varied in contrast (the row so named): the 2D residual row with the gamma remapping above "
    "and no texture (a single slice cannot tell a texture from noise by its neighbours).",
    "Diffusion predicting the correction (residual): the diffusion row's recipe with the network's x0 "
    "output added to the noisy centre slice (DnCNN's residual learning): intensities outside the phantom's "
    "range pass through instead of being mapped into it.",
    "Trained on the phantom and real MR (the row so named): the residual row's recipe on the 12 phantom "
    "subjects plus six real 2D MR images from the same packages, none of them a test image or another view of "
    "one: ITK's BrainWeb T1 and PD axial slices, mid-sagittal head slice and complex-data magnitude slice; "
    "pydicom-data's shoulder (resampled from 0.2 to 0.8 mm) and abdomen. Each real image is its own clean "
    "target, as the real references here are, and is drawn as often as one phantom subject's contrast (a third "
    "of the crops).",
    "Non-local means: scikit-image `denoise_nl_means` (3D, fast mode, 5-voxel patches, 13-voxel search, "
    "sigma from `estimate_sigma`, h = 0.8 sigma), then the Rician bias removed: sqrt(max(x^2 - sigma^2, 0)).",
    f"Diffusion, adapted: the diffusion row's model fine-tuned on each noisy test image alone, without its "
    f"reference (`diffusion-mic adapt`: Recorrupted-to-Recorrupted pairs, noise level estimated from the image, "
    f"rank-8 LoRA, {ADAPT_STEPS} steps of 8 crops), then run on it; its time per volume includes the adaptation. "
    "The quick study adapts for 3 steps, at 5 % only. The bundled 2D model adapted (the row so named): the same "
    "adaptation of brain-mri-denoise-2d, at 5 and 9 % noise only (about 100 s per volume; not in the quick study).",
    "BM4D: PyPI `bm4d` (non-commercial licence, a study-only extra: `pip install .[bm4d]`) with the same "
    "sigma and bias correction; Foi's Rician variance-stabilising transform is not applied (its tables are "
    "not packaged). It takes up to a minute per volume on this CPU, so it runs at 5 and 9 % noise only.",
]

# The recipe of the bundled brain-mri-denoise (Resources/Models/brain-mri-denoise/train.json) as it
# was before it cut inputs along their acquired slices (the same training on the axially stored
# phantom), with the study's budget instead of its 5000 steps; every row starts from it.
# brain-mri-denoise-2d is the diffusion-residual-2d row's recipe at 5000 steps.
RECIPE: dict[str, Any] = {
    "task": {"noise_range": [1, 9]},
    "network": {"channels": [32, 64], "attention_levels": [False, False], "norm_num_groups": 16},
    "schedule": {"prediction_type": "sample", "train_steps": 4},
    "sampler": {"name": "dpm++2m", "steps": 4},
    "patch": [48, 48], "context": 2,
    "train": {"lr": 1e-3, "lr_schedule": "cosine", "ema_decay": 0.99, "ema_start": 20, "seed": 0},
}
QUICK_NETWORK = {"channels": [16, 32], "attention_levels": [False, False], "norm_num_groups": 16}


def rician(clean: np.ndarray, percent: float, seed: int) -> np.ndarray:
    """Clean magnitudes with Rician noise of `percent` % of their foreground's 99th percentile."""
    rng = np.random.default_rng(seed)
    c = clean.astype(np.float32)
    sigma = percent / 100.0 * float(np.percentile(c[foreground(c)], 99))
    n1 = rng.standard_normal(c.shape, dtype=np.float32) * sigma
    n2 = rng.standard_normal(c.shape, dtype=np.float32) * sigma
    return np.sqrt((c + n1) ** 2 + n2**2)


# Training crops varied in contrast and fine detail (tasks/denoise.py: "gamma", "texture"), for scans
# unlike the phantom.
VARIED = {"gamma": [0.5, 2.0], "texture": 0.2}


def _card(ctx: Context, **task: Any):
    return get_task(TASK).make_card(ctx.data.train, budget_recipe(ctx, RECIPE, QUICK_NETWORK, **task))


# ---- the test images (the same for every method) ------------------------------------------------

def test_images(ctx: Context) -> list[dict[str, Any]]:
    """Every (data set, noise level, image): the clean reference, the noisy input, the mask."""
    if "images" in ctx.cache:
        return ctx.cache["images"]
    items = []
    sources: list[tuple[str, str, Volume, Volume]] = []
    for case in ctx.data.test:
        labels = case.read_label()
        sources.append(("phantom", case.id, case.read("T1", "cleanTr"), labels.with_array((labels.array > 0).astype(np.uint8))))
    from scipy import ndimage
    for name, (_, volume) in real_mr().items():
        mask = ndimage.binary_fill_holes(foreground(volume.array))
        sources.append(("real MR", name, volume, volume.with_array(mask.astype(np.uint8))))
        if ctx.quick:
            break
    for k, (kind, name, clean, mask) in enumerate(sources):
        if ctx.quick:
            clean, mask = slab(clean, mask)
        for j, level in enumerate(NOISE_LEVELS if not ctx.quick else (PREVIEW_NOISE,)):
            noisy = clean.with_array(rician(clean.array, level, seed=1000 * k + j))
            items.append({"table": f"{kind}, {level:g} % noise", "image": name, "clean": clean, "noisy": noisy,
                          "mask": mask, "level": level, "kind": kind})
    ctx.cache["images"] = items
    return items


def slab(volume: Volume, mask: Volume, depth: int = 6) -> tuple[Volume, Volume]:
    """The `depth` axial slices around the mask's largest slice (quick studies), geometry kept."""
    z = _largest_slice(mask.array)
    z0 = max(0, min(z - depth // 2, mask.array.shape[0] - depth))
    cut = lambda v: Volume.from_sitk(v.to_sitk()[:, :, z0:z0 + depth])  # noqa: E731
    return cut(volume), cut(mask)


def _largest_slice(mask: np.ndarray) -> int:
    """The axial slice with the most mask voxels."""
    return int(np.argmax(mask.sum(axis=(1, 2)))) if mask.shape[0] > 1 else 0


def _evaluate(ctx: Context, denoise: Callable[[Volume, float], Volume],
              levels: tuple[float, ...] | None = None) -> Evaluation:
    """Run `denoise(noisy, level)` on every test image (of the given noise levels only, if any);
    tables are means per data set and level."""
    items = [i for i in test_images(ctx) if levels is None or i["level"] in levels]
    per_table: dict[str, list[dict[str, float]]] = {}
    per_image: list[dict[str, Any]] = []
    previews: dict[str, np.ndarray] = {}
    seconds = []
    ctx.progress.start("evaluate", len(items))
    for item in items:
        t0 = time.perf_counter()
        out = denoise(item["noisy"], item["level"])
        seconds.append(time.perf_counter() - t0)
        m = image_metrics(out, item["clean"], item["mask"])
        before = image_metrics(item["noisy"], item["clean"], item["mask"])
        row = {"psnr": m["psnr"], "psnr_gain": m["psnr"] - before["psnr"], "ssim": m["ssim"], "rmse": m["rmse"]}
        per_table.setdefault(item["table"], []).append(row)
        per_image.append({"table": item["table"], "image": item["image"], **row})
        key = f"{item['kind']} {item['level']:g} %"
        if item["level"] == PREVIEW_NOISE and key not in previews:
            z = _largest_slice(item["mask"].array)
            previews[key] = out.array[z]
            previews[f"{key} error"] = np.abs(out.array[z] - item["clean"].array[z])
        ctx.progress.advance()
    ctx.progress.close()
    tables = {t: {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} for t, rows in per_table.items()}
    return Evaluation(tables, float(np.median(seconds)), previews, {"per_image": per_image})


def write_reference(ctx: Context) -> None:
    """The figure's first row: the clean references and the noisy inputs."""
    refs: dict[str, np.ndarray] = {}
    for item in test_images(ctx):
        key = f"{item['kind']} {item['level']:g} %"
        if item["level"] == PREVIEW_NOISE and key not in refs:
            z = _largest_slice(item["mask"].array)
            refs[key] = item["clean"].array[z]
            refs[f"{key} input"] = item["noisy"].array[z]
    ctx.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(ctx.out / "reference.npz", **refs)


# ---- methods --------------------------------------------------------------------------------------

def _fit_diffusion(ctx: Context, folder: Path, *, real: bool = False, recipe: dict[str, Any] | None = None,
                   **task: Any) -> dict[str, Any]:
    """The bundled recipe at the study's budget; `task` overrides its "task" settings and `recipe` its
    other entries (e.g. "context", "orientation"). With `real`, the training cases also hold real MR
    images (realmr.TRAINING_SOURCES, none of them a test scan)."""
    settings = {**budget_recipe(ctx, RECIPE, QUICK_NETWORK, **task), **(recipe or {})}
    data = ctx.data.train_dir
    if real:
        data = folder / "data"
        settings["cases"] = settings["cases"] + training_set_with_real(ctx.data.train, ctx.data.train_ids, data)
    card = train(TASK, data, folder / "model", device=str(ctx.device), settings=settings,
                 progress=ctx.progress, resume=True)
    return budget_used(card.training)


def _model_denoiser(ctx: Context, model: str | Path, **options: Any) -> Callable[[Volume, float], Volume]:
    def run(noisy: Volume, level: float) -> Volume:
        return api.denoise(noisy, model, device=str(ctx.device), **options).outputs["output"]
    return run


def _eval_diffusion(ctx: Context, folder: Path) -> Evaluation:
    return _evaluate(ctx, _model_denoiser(ctx, folder / "model"))


def _eval_adapted(base: str | None = None,
                  levels: tuple[float, ...] = NOISE_LEVELS) -> Callable[[Context, Path], Evaluation]:
    """A model adapted to every test image on its own before it denoises it: the bundled `base`, or
    the diffusion row's model (trained here first if that row has not run)."""
    def evaluate(ctx: Context, folder: Path) -> Evaluation:
        shared = ctx.out / "diffusion"
        if base is None and not (shared / "trained.json").is_file():
            write_json(shared / "trained.json", _fit_diffusion(ctx, shared))
        model = shared / "model" if base is None else base

        def run(noisy: Volume, level: float) -> Volume:
            with tempfile.TemporaryDirectory(prefix="adapted-", dir=folder) as tmp:
                adapt(TASK, model, noisy, Path(tmp) / "model", steps=3 if ctx.quick else ADAPT_STEPS,
                      device=str(ctx.device))
                return api.denoise(noisy, Path(tmp) / "model", device=str(ctx.device)).outputs["output"]
        folder.mkdir(parents=True, exist_ok=True)
        evaluation = _evaluate(ctx, run, levels=(PREVIEW_NOISE,) if ctx.quick else levels)
        if base is None:
            evaluation.extra["training"] = json.loads((shared / "trained.json").read_text(encoding="utf-8"))
        return evaluation
    return evaluate


def _eval_bundled(name: str) -> Callable[[Context, Path], Evaluation]:
    return lambda ctx, folder: _evaluate(ctx, _model_denoiser(ctx, name))


def _baseline_fit(kind: str, spec: Callable[[Any], dict[str, Any]], **task: Any):
    def fit(ctx: Context, folder: Path) -> dict[str, Any]:
        card = _card(ctx, **task)
        mse = lambda pred, batch: torch.nn.functional.mse_loss(pred, batch.target.to(pred.device))  # noqa: E731
        return fit_supervised(ctx, folder, card, kind, spec(card), mse, label=kind)
    return fit


def _eval_baseline(ctx: Context, folder: Path) -> Evaluation:
    net, _ = load_baseline(folder, ctx.device)
    card = one_step_card(_card(ctx))
    task = get_task(TASK)
    wrapped = AsX0(net, noisy_channels=1).eval()

    def run(noisy: Volume, level: float) -> Volume:
        options = RunOptions(device=str(ctx.device)).with_card_defaults(card)
        with torch.inference_mode():
            return task.run(card, wrapped, [noisy], options, Progress(), ctx.device).outputs["output"]
    return _evaluate(ctx, run)


def _unet_spec(card) -> dict[str, Any]:
    config = dict(card.network)
    config["in_channels"] = config["in_channels"] - card.network["out_channels"]
    return {"config": config}


def _dncnn_spec(quick: bool):
    def spec(card) -> dict[str, Any]:
        channels = card.network["in_channels"] - card.network["out_channels"]
        return {"in_channels": channels, "out_channels": 1, "centre": card.context,
                "depth": 5 if quick else 17, "features": 16 if quick else 64}
    return spec


def _sigma(noisy: np.ndarray) -> float:
    from skimage.restoration import estimate_sigma
    a = noisy[0] if noisy.shape[0] == 1 else noisy
    return float(estimate_sigma(a, channel_axis=None))


def _unbias(x: np.ndarray, sigma: float) -> np.ndarray:
    """First-order Rician bias removal of a denoised magnitude."""
    return np.sqrt(np.maximum(x.astype(np.float32) ** 2 - sigma**2, 0.0)).astype(np.float32)


def _eval_nlm(ctx: Context, folder: Path) -> Evaluation:
    from skimage.restoration import denoise_nl_means

    def run(noisy: Volume, level: float) -> Volume:
        a = noisy.array.astype(np.float32)
        sigma = _sigma(a)
        img = a[0] if a.shape[0] == 1 else a
        out = denoise_nl_means(img, h=0.8 * sigma, sigma=sigma, fast_mode=True, patch_size=5, patch_distance=6,
                               channel_axis=None)
        return noisy.with_array(_unbias(out.reshape(a.shape), sigma))
    return _evaluate(ctx, run)


def _eval_bm4d(ctx: Context, folder: Path) -> Evaluation:
    import bm4d

    def run(noisy: Volume, level: float) -> Volume:
        a = noisy.array.astype(np.float32)
        sigma = _sigma(a)
        out = bm4d.bm4d(np.transpose(a, (1, 2, 0)), sigma)      # (y, x, z): z may be 1
        return noisy.with_array(_unbias(np.transpose(np.asarray(out, np.float32), (2, 0, 1)), sigma))
    return _evaluate(ctx, run, levels=(PREVIEW_NOISE, NOISE_LEVELS[-1]))


def _eval_identity(ctx: Context, folder: Path) -> Evaluation:
    return _evaluate(ctx, lambda noisy, level: noisy)


def methods(quick: bool) -> list[Method]:
    out = [
        Method("diffusion", "Diffusion (x0, 4 Fast-DDPM steps, 2.5D)", "diffusion", _eval_diffusion, _fit_diffusion),
        Method("diffusion-noise-map", "Diffusion told the noise level (FFDNet-style map; estimated per scan)",
               "diffusion", _eval_diffusion, partial(_fit_diffusion, noise_map=True)),
        Method("diffusion-residual", "Diffusion predicting the correction to the noisy image (residual)",
               "diffusion", _eval_diffusion, partial(_fit_diffusion, residual=True)),
        Method("diffusion-residual-varied", "Diffusion predicting the correction, crops varied in contrast and fine detail",
               "diffusion", _eval_diffusion, partial(_fit_diffusion, residual=True, **VARIED)),
        Method("diffusion-residual-real", "Diffusion predicting the correction, trained on the phantom and real MR",
               "diffusion", _eval_diffusion, partial(_fit_diffusion, residual=True, real=True)),
        Method("diffusion-residual-2d", "Diffusion predicting the correction, one slice alone (2D, no neighbours)",
               "diffusion", _eval_diffusion, partial(_fit_diffusion, residual=True, recipe={"context": 0})),
        Method("diffusion-residual-2d-gamma", "Diffusion predicting the correction, 2D, crops varied in contrast",
               "diffusion", _eval_diffusion, partial(_fit_diffusion, residual=True, recipe={"context": 0},
                                                     gamma=VARIED["gamma"])),
        Method("diffusion-adapted", "Diffusion, adapted to each scan (self-supervised)", "diffusion", _eval_adapted(),
               note="the diffusion row's model; adaptation time included"),
        Method("diffusion-bundled", "Diffusion, bundled brain-mri-denoise", "diffusion", _eval_bundled("brain-mri-denoise"),
               note=bundled_note("brain-mri-denoise")),
        Method("diffusion-bundled-2d", "Diffusion, bundled brain-mri-denoise-2d (each slice alone)", "diffusion",
               _eval_bundled("brain-mri-denoise-2d"), note=bundled_note("brain-mri-denoise-2d")),
        Method("diffusion-bundled-2d-adapted", "Diffusion, bundled brain-mri-denoise-2d adapted to each scan "
               "(self-supervised)", "diffusion",
               _eval_adapted("brain-mri-denoise-2d", (PREVIEW_NOISE, NOISE_LEVELS[-1])),
               note=bundled_note("brain-mri-denoise-2d", "; adaptation time included; 5 and 9 % noise only")),
        Method("unet", "UNet regression (same network, MSE)", "learned", _eval_baseline,
               _baseline_fit("diffusion-unet", _unet_spec)),
        Method("diffusion-varied", "Diffusion, crops varied in contrast and fine detail", "diffusion",
               _eval_diffusion, partial(_fit_diffusion, **VARIED)),
        Method("unet-varied", "UNet regression, crops varied in contrast and fine detail", "learned",
               _eval_baseline, _baseline_fit("diffusion-unet", _unet_spec, **VARIED)),
        Method("dncnn", "DnCNN", "learned", _eval_baseline, _baseline_fit("dncnn", _dncnn_spec(quick)),
               note="stand-in: MONAI blocks, deepinv needs torchvision"),
        Method("nlm", "Non-local means (scikit-image)", "classic", _eval_nlm),
        Method("bm4d", "BM4D", "classic", _eval_bm4d),
        Method("noisy", "Noisy input", "floor", _eval_identity),
    ]
    if quick:    # BM4D takes minutes per volume here; the full study runs it when `bm4d` is installed;
        # the quick study adapts one model (the diffusion-adapted row), which proves the wiring of both
        out = [m for m in out if m.name not in ("bm4d", "diffusion-bundled-2d-adapted")]
    else:
        import importlib.util
        if importlib.util.find_spec("bm4d") is None:
            out = [m for m in out if m.name != "bm4d"]
    return out
