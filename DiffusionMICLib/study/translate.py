"""Modality-conversion study (the survey's Table 10): the three directions T1, T2 -> FLAIR;
T1, FLAIR -> T2; T2, FLAIR -> T1, each with conditional diffusion, L1 regression with the same
UNet and with an attention UNet, pix2pix, CycleGAN (unpaired) and a per-voxel polynomial
intensity regression as the floor. NMAE, PSNR and SSIM inside the brain (the task's `evaluate`)."""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .. import api
from ..engine.batches import TrainingCase
from ..engine.pipeline import train
from ..engine.space import robust_scale
from ..models import ModelCard, read_card, resolve_model
from ..progress import Progress
from ..tasks import RunOptions, get_task
from ..tasks.translate import NORMALISATION
from ..volume import Volume
from .adversarial import AdversarialTrainer, CycleTrainer
from .core import Context, Evaluation, Method, budget_used, bundled_note
from .denoise import _largest_slice, slab
from .learners import AsX0, fit_supervised, load_baseline, network, one_step_card, save_baseline

TASK = "translate"
CHANNELS = ["T1", "T2", "FLAIR"]
DIRECTIONS: tuple[tuple[tuple[str, ...], str], ...] = ((("T1", "T2"), "FLAIR"), (("T1", "FLAIR"), "T2"),
                                                        (("T2", "FLAIR"), "T1"))
BUNDLED = "brain-mri-t1t2-to-flair"       # T1 + T2 -> FLAIR only
POLYNOMIAL_DEGREE = 3
COLUMNS = [("nmae", "NMAE", "lower"), ("psnr", "PSNR (dB)", "higher"), ("ssim", "SSIM", "higher")]
NOTES = [
    "One table per direction. Inputs: the held-out subjects' acquired images (imagesTr: bias field and "
    "5 % Rician noise); reference: the clean target contrast (cleanTr); NMAE, PSNR and SSIM inside the brain "
    "(label > 0), prediction and reference each divided by its own 99.5th foreground percentile (the task's `evaluate`).",
    "Every learned method trains each direction for the study's steps × batch on the same 2D crops and the "
    "same training subjects; the time limit covers all three directions (a third each). The training column "
    "gives steps × batch per direction and the wall time of all three.",
    "Every baseline runs through the translate task's own pipeline (normalisation, foreground crop, masking) "
    "as an x0-predictor with a one-step DDIM sampler, exactly as the diffusion model does.",
    "pix2pix: the same generator as the UNet rows + MONAI PatchDiscriminator (least-squares PatchAdversarialLoss, "
    "L1 weight 100). CycleGAN: two such generators and two PatchDiscriminators, cycle weight 10; unpaired: "
    "its input crops come from the first half of the training subjects, its target crops from the second half.",
    f"Polynomial (floor): every monomial of the normalised input intensities up to degree {POLYNOMIAL_DEGREE}, "
    "least squares over the training subjects' head voxels.",
]

# The recipe of the bundled brain-mri-t1t2-to-flair (Resources/Models/brain-mri-t1t2-to-flair/train.json),
# with the study's budget instead of its 1000 steps.
RECIPE: dict[str, Any] = {
    "schedule": {"prediction_type": "sample", "train_steps": 4},
    "sampler": {"name": "dpm++2m", "steps": 4},
    "patch": [64, 64],
    "train": {"lr": 1e-3, "ema_decay": 0.995, "ema_start": 20, "seed": 101},
}
QUICK_NETWORK = {"channels": [16, 32], "attention_levels": [False, False], "norm_num_groups": 16}


def slug(inputs: tuple[str, ...], output: str) -> str:
    return f"{'-'.join(inputs)}-to-{output}".lower()


def table(ctx: Context, inputs: tuple[str, ...], output: str) -> str:
    return f"{ctx.data.name}: {', '.join(inputs)} → {output}"


def recipe(ctx: Context, inputs: tuple[str, ...], output: str) -> dict[str, Any]:
    """The bundled model's recipe for one direction with the study's budget (`_per_direction`
    gives each direction a third of the time)."""
    b = ctx.budget
    settings = {**RECIPE, "task": {"inputs": list(inputs), "output": output},
                "train": {**RECIPE["train"], "max_steps": b.steps, "batch_size": b.batch_size,
                          "time_limit_s": b.time_limit_s},
                "cases": ctx.data.train_ids, "command": f"diffusion-mic study translate{' --quick' if ctx.quick else ''}"}
    if ctx.quick:
        settings["network"] = QUICK_NETWORK
    return settings


def card(ctx: Context, inputs: tuple[str, ...], output: str) -> ModelCard:
    return get_task(TASK).make_card(ctx.data.train, recipe(ctx, inputs, output))


def training_cases(ctx: Context, c: ModelCard) -> list[TrainingCase]:
    """The direction's training cases in model space, loaded once per run for every baseline."""
    key = ("cases", *c.inputs, c.outputs[0])
    if key not in ctx.cache:
        ctx.cache[key] = get_task(TASK).training_cases(c, ctx.data.train, ctx.data.train_cases)
    return ctx.cache[key]


# ---- the test cases (the same for every method) -------------------------------------------------

def test_items(ctx: Context) -> list[dict[str, Any]]:
    """Every (direction, held-out case): the input volumes, the clean reference, the brain mask."""
    if "items" in ctx.cache:
        return ctx.cache["items"]
    items = []
    for case in ctx.data.test:
        labels = case.read_label()
        brain = labels.with_array((labels.array > 0).astype(np.uint8))
        for inputs, output in DIRECTIONS:
            volumes = [case.read(ch) for ch in inputs]
            variant = "cleanTr" if output in case.variants.get("cleanTr", {}) else None
            reference = case.read(output, variant)
            mask = brain
            if ctx.quick:
                volumes = [slab(v, brain)[0] for v in volumes]
                reference, mask = slab(reference, brain)
            items.append({"inputs": inputs, "output": output, "case": case.id, "volumes": volumes,
                          "reference": reference, "mask": mask})
    ctx.cache["items"] = items
    return items


def _scaled(v: Volume) -> np.ndarray:
    """A volume divided by its robust scale, as the task's `evaluate` compares them."""
    return v.array.astype(np.float32) / robust_scale(v.array, NORMALISATION)


def preview_key(inputs: tuple[str, ...], output: str) -> str:
    return f"{output} from {'+'.join(inputs)}"


Convert = Callable[[tuple[str, ...], str, list[Volume]], Volume]


def _evaluate(ctx: Context, convert: Convert, directions=DIRECTIONS) -> Evaluation:
    """Run `convert(inputs, output, volumes)` on every test case of the given directions; tables
    are means over the held-out cases, one per direction."""
    items = [i for i in test_items(ctx) if (i["inputs"], i["output"]) in directions]
    task = get_task(TASK)
    rows: dict[str, list[dict[str, float]]] = {}
    per_case, previews, seconds = [], {}, []
    ctx.progress.start("evaluate", len(items))
    for item in items:
        t0 = time.perf_counter()
        out = convert(item["inputs"], item["output"], item["volumes"])
        seconds.append(time.perf_counter() - t0)
        m = task.evaluate(out, item["reference"], item["mask"])
        row = {k: float(m[k]) for k, _, _ in COLUMNS}
        name = table(ctx, item["inputs"], item["output"])
        rows.setdefault(name, []).append(row)
        per_case.append({"table": name, "case": item["case"], **row})
        key = preview_key(item["inputs"], item["output"])
        if key not in previews:
            z = _largest_slice(item["mask"].array)
            previews[key] = _scaled(out)[z]
            previews[f"{key} error"] = np.abs(_scaled(out)[z] - _scaled(item["reference"])[z]) * (item["mask"].array[z] > 0)
        ctx.progress.advance()
    ctx.progress.close()
    tables = {t: {k: float(np.mean([r[k] for r in rs])) for k in rs[0]} for t, rs in rows.items()}
    return Evaluation(tables, float(np.median(seconds)), previews, {"per_case": per_case})


def write_reference(ctx: Context) -> None:
    """The figure's first row: the clean reference of each direction and its first input."""
    refs: dict[str, np.ndarray] = {}
    for item in test_items(ctx):
        key = preview_key(item["inputs"], item["output"])
        if key not in refs:
            z = _largest_slice(item["mask"].array)
            refs[key] = _scaled(item["reference"])[z]
            refs[f"{key} input"] = _scaled(item["volumes"][0])[z]
    ctx.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(ctx.out / "reference.npz", **refs)


# ---- methods ----------------------------------------------------------------------------------

def _per_direction(fit_one: Callable[[Context, Path, tuple[str, ...], str], dict[str, Any]]):
    """Train one model per direction into folder/<direction>, each with a third of the study's
    time limit; the budget: the fewest steps any direction got (the safety stop may end one
    early) × batch, wall time of all three."""
    def fit(ctx: Context, folder: Path) -> dict[str, Any]:
        share = replace(ctx, budget=replace(ctx.budget, time_limit_s=ctx.budget.time_limit_s / len(DIRECTIONS)))
        runs = {slug(i, o): _finished(folder / slug(i, o)) or fit_one(share, folder / slug(i, o), i, o)
                for i, o in DIRECTIONS}
        first = next(iter(runs.values()))
        return {"steps": min(r["steps"] for r in runs.values()), "batch_size": first["batch_size"],
                "wall_time_s": round(sum(r["wall_time_s"] for r in runs.values()), 1), "directions": runs}
    return fit


def _finished(where: Path) -> dict[str, Any] | None:
    """The budget a direction already trained with (an interrupted study resumes after it), else None."""
    if (where / "baseline.json").is_file():
        return json.loads((where / "baseline.json").read_text(encoding="utf-8"))["training"]
    if (where / "model" / "model.json").is_file():
        return budget_used(read_card(where / "model").training)
    return None


def _fit_diffusion(ctx: Context, folder: Path, inputs: tuple[str, ...], output: str) -> dict[str, Any]:
    train(TASK, ctx.data.train_dir, folder / "model", settings=recipe(ctx, inputs, output),
          device=str(ctx.device), progress=ctx.progress, resume=True)
    return _finished(folder)


def _model_converter(ctx: Context, model: Callable[[tuple[str, ...], str], str | Path]) -> Convert:
    def run(inputs: tuple[str, ...], output: str, volumes: list[Volume]) -> Volume:
        return api.translate(volumes, model(inputs, output), device=str(ctx.device)).outputs["output"]
    return run


def _eval_diffusion(ctx: Context, folder: Path) -> Evaluation:
    return _evaluate(ctx, _model_converter(ctx, lambda i, o: folder / slug(i, o) / "model"))


def _eval_bundled(ctx: Context, folder: Path) -> Evaluation:
    c = read_card(resolve_model(BUNDLED))
    direction = (tuple(c.inputs), c.outputs[0])
    return _evaluate(ctx, _model_converter(ctx, lambda i, o: BUNDLED), directions=(direction,))


def _l1(pred: torch.Tensor, batch) -> torch.Tensor:
    return torch.nn.functional.l1_loss(pred, batch.target.to(pred.device))


def _unet(c: ModelCard, inputs: int, outputs: int) -> dict[str, Any]:
    """The diffusion network's config as a regression UNet from `inputs` to `outputs` channels."""
    return {"config": {**c.network, "in_channels": inputs, "out_channels": outputs}}


def _discriminator(ctx: Context, in_channels: int) -> dict[str, Any]:
    return {"in_channels": in_channels, "channels": 16 if ctx.quick else 32, "num_layers_d": 2 if ctx.quick else 3}


def _fit_unet(ctx: Context, folder: Path, inputs: tuple[str, ...], output: str) -> dict[str, Any]:
    c = card(ctx, inputs, output)
    return fit_supervised(ctx, folder, c, "diffusion-unet", _unet(c, len(inputs), 1), _l1, label="UNet L1",
                          cases=training_cases(ctx, c))


def _fit_attention(ctx: Context, folder: Path, inputs: tuple[str, ...], output: str) -> dict[str, Any]:
    c = card(ctx, inputs, output)
    levels = list(c.network["channels"])     # as deep as the diffusion UNet: the pipeline pads to its factor
    spec = {"in_channels": len(inputs), "out_channels": 1, "channels": levels, "strides": [2] * (len(levels) - 1)}
    return fit_supervised(ctx, folder, c, "attention-unet", spec, _l1, label="attention UNet L1",
                          cases=training_cases(ctx, c))


def _fit_pix2pix(ctx: Context, folder: Path, inputs: tuple[str, ...], output: str) -> dict[str, Any]:
    c = card(ctx, inputs, output)
    return fit_supervised(ctx, folder, c, "diffusion-unet", _unet(c, len(inputs), 1), _l1, label="pix2pix",
                          cases=training_cases(ctx, c), trainer_cls=AdversarialTrainer,
                          discriminator=_discriminator(ctx, len(inputs) + 1))


def _fit_cyclegan(ctx: Context, folder: Path, inputs: tuple[str, ...], output: str) -> dict[str, Any]:
    c = card(ctx, inputs, output)
    spec = {"forward": _unet(c, len(inputs), 1), "backward": _unet(c, 1, len(inputs))}
    return fit_supervised(ctx, folder, c, "cyclegan", spec, None, label="CycleGAN", trainer_cls=CycleTrainer,
                          cases=training_cases(ctx, c),
                          unpaired=True, discriminators=(_discriminator(ctx, len(inputs)), _discriminator(ctx, 1)))


def _fit_polynomial(ctx: Context, folder: Path, inputs: tuple[str, ...], output: str,
                    max_voxels: int = 1_000_000) -> dict[str, Any]:
    """Least squares of the target on the input monomials over the training subjects' head voxels."""
    c = card(ctx, inputs, output)
    t0 = time.perf_counter()
    cases = training_cases(ctx, c)
    x = np.concatenate([tc.cond[:, tc.foreground] for tc in cases], axis=1)         # (C, N)
    y = np.concatenate([tc.target[0, tc.foreground] for tc in cases])
    if y.size > max_voxels:
        pick = np.random.default_rng(0).choice(y.size, max_voxels, replace=False)
        x, y = x[:, pick], y[pick]
    spec = {"in_channels": len(inputs), "degree": POLYNOMIAL_DEGREE}
    poly = network("polynomial", **spec)
    features = poly.features(torch.from_numpy(x)[None])[0].T                         # (N, K)
    poly.coefficients.copy_(torch.linalg.lstsq(features, torch.from_numpy(y).double()[:, None]).solution[:, 0])
    info = {"steps": 1, "batch_size": int(y.size), "wall_time_s": round(time.perf_counter() - t0, 1),
            "parameters": len(poly.powers), "solver": "least squares"}
    save_baseline(folder, "polynomial", spec, poly, info)
    return info


def baseline_converter(ctx: Context, where: Callable[[tuple[str, ...], str], Path]) -> Convert:
    """A trained baseline (saved in where(inputs, output)) run through the task's own pipeline."""
    task = get_task(TASK)

    def run(inputs: tuple[str, ...], output: str, volumes: list[Volume]) -> Volume:
        net, _ = load_baseline(where(inputs, output), ctx.device)
        c = one_step_card(card(ctx, inputs, output))
        options = RunOptions(device=str(ctx.device)).with_card_defaults(c)
        with torch.inference_mode():
            return task.run(c, AsX0(net, noisy_channels=1).eval(), volumes, options, Progress(), ctx.device).outputs["output"]
    return run


def _eval_baseline(ctx: Context, folder: Path) -> Evaluation:
    return _evaluate(ctx, baseline_converter(ctx, lambda i, o: folder / slug(i, o)))


def methods(quick: bool) -> list[Method]:
    return [
        Method("diffusion", "Diffusion (x0, 4 Fast-DDPM steps)", "diffusion", _eval_diffusion,
               _per_direction(_fit_diffusion)),
        Method("diffusion-bundled", f"Diffusion, bundled {BUNDLED}", "diffusion", _eval_bundled, note=bundled_note(BUNDLED, "; T1 + T2 → FLAIR only")),
        Method("unet-l1", "UNet, L1 regression (same network)", "learned", _eval_baseline, _per_direction(_fit_unet)),
        Method("attention-unet", "Attention UNet, L1 regression (MONAI AttentionUnet)", "learned", _eval_baseline,
               _per_direction(_fit_attention)),
        Method("pix2pix", "pix2pix (same UNet + PatchGAN)", "learned", _eval_baseline, _per_direction(_fit_pix2pix)),
        Method("cyclegan", "CycleGAN (unpaired)", "learned", _eval_baseline, _per_direction(_fit_cyclegan)),
        Method("polynomial", f"Polynomial intensity regression (degree {POLYNOMIAL_DEGREE})", "floor", _eval_baseline,
               _per_direction(_fit_polynomial)),
    ]
