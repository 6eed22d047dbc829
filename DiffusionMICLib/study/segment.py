"""Segmentation study (the survey's Table 11): the diffusion segmenter (ensembles of 1 and 5
draws) against an nnU-Net-style DynUNet, SwinUNETR (VT-UNet stand-in), an encoder-decoder
without skips (SegNet stand-in) and the nearest tissue centroid on the intensities, on held-out
phantom subjects: Dice, HD95 (mm) and IoU per label (CSF, GM, WM, lesion)."""
from __future__ import annotations

import json
import math
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .. import api
from ..datasets import Case
from ..engine.pipeline import train
from ..errors import DiffusionMICError
from ..metrics import calibration_error, segmentation_metrics, uncertainty_error_agreement
from ..models import ModelCard, read_card, resolve_model
from ..progress import Progress
from ..tasks import RunOptions, RunResult, get_task
from ..volume import Volume
from .core import Context, Evaluation, Method, budget_recipe, budget_used, bundled_note, write_json
from . import nnunet
from .learners import AsX0, fit_supervised, load_baseline, one_step_card

TASK = "segment"
CHANNELS = ["T1", "T2", "PD", "FLAIR"]
LABELS = ("CSF", "GM", "WM", "lesion")        # the phantom's; a user data set's other labels count in the means
BUNDLED = "brain-mri-lesion-segment"
QUICK_DEPTH = 6                               # quick studies: this many axial slices around the largest lesion
COLUMNS = [("mean_dice", "Dice (mean)", "higher"), *[(f"dice_{n}", f"Dice {n}", "higher") for n in LABELS],
           ("mean_hd95_mm", "HD95 mm (mean)", "lower"), *[(f"hd95_{n}", f"HD95 {n}", "lower") for n in LABELS],
           ("mean_iou", "IoU (mean)", "higher"), *[(f"iou_{n}", f"IoU {n}", "higher") for n in LABELS],
           ("ece", "ECE", "lower"), ("uncertainty_auroc", "AUROC uncertainty→errors", "higher"),
           ("uncertainty_dice", "Dice uncertain∩errors", "higher")]
NOTES = [
    "Each test subject is segmented from its acquired T1, T2, PD and FLAIR (noise, bias field, lesions); "
    "the metrics are MONAI's Dice, IoU and 95 % Hausdorff distance (mm, on the volume's spacing) per label "
    "against the phantom's label map, averaged over the test subjects; the means are over the data set's "
    "labels (background excluded). HD95 is '–' (infinite) where a label is missing from the prediction or "
    "the reference of any test subject, and then so is the mean HD95.",
    "Every method runs through the segment task's own pipeline: the same normalisation (each channel's "
    "99.5th foreground percentile -> 1), the same head crop, the same largest-component post-processing; "
    "the learned baselines train on the same 64 x 64 crops (40 % centred on lesion voxels) for the same "
    "budget, with MONAI DiceCELoss (softmax, batch Dice) against the one-hot label map and AdamW at "
    "lr 1e-2 (nnU-Net's initial rate; at 1e-3 they learned far slower in a short budget); the diffusion "
    "model keeps its bundled recipe's lr 1e-3. The learned baselines infer as nnU-Net does, by Gaussian-"
    "weighted 64 x 64 sliding windows (overlap 0.5), so that their instance norms see crop-sized "
    "statistics (on whole slices the nnU-Net stand-in scored below the floor); the diffusion model runs "
    "whole slices.",
    "nnU-Net (nnunetv2): the real nnU-Net v2 from PyPI (`make nnunet`; listed when installed) run as "
    "nnU-Net runs: its fingerprint, plans and preprocessing (z-score per channel, crop to the head), its "
    "2D configuration (its own patch size and network, planned for this data set), its trainer with its "
    "augmentations, deep supervision, Dice + CE and poly learning rate over the budget (the study's steps "
    "as epochs of at most 250 iterations, the batch set to the study's; fold 'all': every training subject), and "
    "its predictor (Gaussian sliding windows, mirroring). Not as nnU-Net runs: no 5-fold "
    "cross-validation, ensemble or post-processing choice, and 1500 iterations instead of 250 000.",
    "nnU-Net stand-in: MONAI DynUNet set up as nnU-Net's 2D configuration: 3 x 3 kernels, instance norm, leaky ReLU, "
    "filters doubling from 32 (capped at 256), down to 4 x 4, deep supervision (weights 1/2^i), Dice + CE, "
    "and nnU-Net's augmentations that are cheap on 2D crops (MONAI transforms: rotation and scaling, "
    "Gaussian noise and blur, brightness, contrast, low resolution, gamma, mirroring); no elastic "
    "deformation, no 5-fold ensemble.",
    "VT-UNet stand-in: MONAI SwinUNETR (2D). SegNet stand-in: MONAI AutoEncoder (an encoder-decoder "
    "without skip connections). Floor: every voxel takes the label whose mean normalised intensity "
    "vector (over the training subjects' voxels) is nearest.",
    "Diffusion, ensemble 5: the ensemble-1 model with 5 draws averaged (no training of its own; its "
    "budget is that model's). Trained on mirrored crops: the same recipe with half the training crops flipped "
    "left-right (the only augmentation; the other diffusion rows have none); its 5 draws mirror as nnU-Net's "
    "predictor does: the 2nd and 4th draw are of the left-right mirrored input, mirrored back. Learning rate "
    "3e-3 or 1e-2: the same recipe with AdamW at that rate instead of 1e-3 (cosine-decayed to 1 % as before; full study only).",
    "Calibration and uncertainty, over the voxels that the reference or the prediction labels (the head): "
    "ECE = MONAI's expected calibration error of each method's class probabilities (20 bins, one-vs-rest "
    "per label, background left out, averaged over the labels); the probabilities are the task's: the "
    "averaged draws' class scores for diffusion, softmax for the networks, one-hot for the floor. The "
    "uncertainty map (the entropy of those probabilities) is scored as a detector of the error voxels "
    "(prediction != reference): its AUROC, and the Dice of the uncertain region with the error region at "
    "the best entropy threshold (optimistic, as the anomaly study's best Dice).",
]

# The recipe of the bundled brain-mri-lesion-segment (Resources/Models/brain-mri-lesion-segment/train.json)
# with the study's budget instead of its 4000 steps / 30 min.
RECIPE: dict[str, Any] = {
    "task": {"inputs": CHANNELS, "focus": ["lesion"], "oversample": 0.4},
    "schedule": {"prediction_type": "sample", "train_steps": 4},
    "sampler": {"name": "dpm++2m", "steps": 4},
    "defaults": {"largest_component": True},
    "patch": [64, 64],
    "train": {"lr": 1e-3, "lr_schedule": "cosine", "ema_decay": 0.995, "ema_start": 20, "seed": 103},
}
# The diffusion-wide rows' crop: a whole 2 mm phantom slice (104 x 88; nnU-Net plans 112 x 96 for
# it); 64 x 64 crops see 45 % of one. A step takes about 3x as long (1.2 s here; the attention
# level's cost grows with the square of the crop's area).
WIDE_PATCH = [104, 88]
QUICK_NETWORK = {"channels": [16, 32], "attention_levels": [False, False], "norm_num_groups": 16}

# Baseline networks (learners.network kinds and specs, in/out channels added per data set): full, quick.
NNUNET = ({"filters": [32, 64, 128, 256, 256], "strides": [1, 2, 2, 2, 2], "deep_supr_num": 3},
          {"filters": [8, 16, 32, 64], "strides": [1, 2, 2, 2], "deep_supr_num": 2})
SWIN = ({"feature_size": 24, "window_size": 4},
        {"feature_size": 12, "depths": (1, 1, 1, 1), "num_heads": (3, 3, 3, 3), "window_size": 4})
SEGNET = ({"channels": (32, 64, 128, 256), "strides": (2, 2, 2, 2), "num_res_units": 2},
          {"channels": (16, 32, 64), "strides": (2, 2, 2), "num_res_units": 2})
# AdamW learning rate of the baselines (cosine-decayed to 1 %), nnU-Net's initial 1e-2. Measured with
# quick networks, 300 steps of batch 8 on one subject's 8-slice slab, tested on another's (mean Dice;
# nearest centroid 0.75): DynUNet 0.56 at 1e-3, 0.84 at 1e-2; SwinUNETR 0.75 at 3e-3, 0.84 at 1e-2;
# an 8-16-32 encoder-decoder 0.48 at 1e-3, 0.72 at 3e-3, 0.78 at 1e-2.
LR = 1e-2
# The diffusion-lr rows' AdamW rates (cosine-decayed as the recipe's 1e-3): row name suffix -> rate.
FAST_LRS = {"lr3": 3e-3, "lr10": 1e-2}
DICE_CE = 1.0     # the diffusion-dice-ce row's weight of Dice + CE on the x0 prediction (tasks/segment.py)


def _card(ctx: Context) -> ModelCard:
    return get_task(TASK).make_card(ctx.data.train, budget_recipe(ctx, RECIPE, QUICK_NETWORK))


# ---- the test cases (the same for every method) -------------------------------------------------

def cut_slab(volumes: list[Volume], z: int, depth: int) -> tuple[list[Volume], int]:
    """`depth` axial slices around slice z of every volume (geometry kept), and z's index in the slab."""
    n = volumes[0].array.shape[0]
    z0 = max(0, min(z - depth // 2, n - depth))
    return [Volume.from_sitk(v.to_sitk()[:, :, z0:z0 + depth]) for v in volumes], z - z0


def largest_slice(mask: np.ndarray) -> int:
    """The axial slice (array axis 0) with the most mask voxels."""
    return int(np.argmax(mask.sum(axis=(1, 2))))


def _labels(ctx: Context) -> dict[str, int]:
    return {k: v for k, v in ctx.data.train.labels.items() if v != 0}


def _lesion_or_foreground(ctx: Context, labels: np.ndarray) -> np.ndarray:
    value = ctx.data.train.labels.get("lesion")
    lesion = labels == value if value is not None else np.zeros(labels.shape, bool)
    return lesion if lesion.any() else labels > 0


def held_out(ctx: Context) -> list[dict[str, Any]]:
    """Every test case's inputs (CHANNELS), label map and preview slice (its largest lesion slice);
    quick studies cut each to a slab of QUICK_DEPTH slices around it."""
    if "cases" in ctx.cache:
        return ctx.cache["cases"]
    out = []
    for case in ctx.data.test:
        volumes = [case.read(ch) for ch in CHANNELS] + [case.read_label()]
        z = largest_slice(_lesion_or_foreground(ctx, volumes[-1].array))
        if ctx.quick:
            volumes, z = cut_slab(volumes, z, QUICK_DEPTH)
        out.append({"id": case.id, "inputs": volumes[:-1], "labels": volumes[-1], "z": z})
    ctx.cache["cases"] = out
    return out


def _flatten(m: dict[str, Any]) -> dict[str, float | None]:
    """One case's row; HD95 None = infinite (a label missing from one map), also in the mean."""
    infinite = any(v["hd95_mm"] is None for v in m["labels"].values())
    row = {"mean_dice": m["mean_dice"], "mean_hd95_mm": None if infinite else m["mean_hd95_mm"],
           "mean_iou": m["mean_iou"]}
    for name, v in m["labels"].items():
        row.update({f"dice_{name}": v["dice"], f"hd95_{name}": v["hd95_mm"], f"iou_{name}": v["iou"]})
    return row


def _mean(values: list[float | None]) -> float | None:
    """The mean over cases; None (an infinite HD95) if any case has None."""
    if any(v is None or math.isnan(v) for v in values):
        return None
    return float(np.mean(values)) if values else None


def calibration_row(result: RunResult, ref: Volume) -> dict[str, float | None]:
    """ECE of the run's class probabilities and how its uncertainty marks its errors, over the head
    (voxels either map labels)."""
    pred = result.outputs["output"]
    head = (ref.array > 0) | (pred.array > 0)
    values = list(result.info["labels"].values())
    agreement = uncertainty_error_agreement(result.outputs["uncertainty"], pred, ref,
                                            ref.with_array(head.astype(np.uint8)))
    return {"ece": calibration_error(result.arrays["probabilities"], ref.array, values, head),
            "uncertainty_auroc": agreement["auroc"], "uncertainty_dice": agreement["dice"]}


def _evaluate(ctx: Context, segment: Callable[[list[Volume]], RunResult]) -> Evaluation:
    """Segment every test case; the table is the mean over cases (nulls skipped)."""
    cases = held_out(ctx)
    labels = _labels(ctx)
    rows, seconds, previews = [], [], {}
    ctx.progress.start("evaluate", len(cases))
    for item in cases:
        t0 = time.perf_counter()
        result = segment(item["inputs"])
        seconds.append(time.perf_counter() - t0)
        pred = result.outputs["output"]
        rows.append({"case": item["id"], **_flatten(segmentation_metrics(pred, item["labels"], labels)),
                     **calibration_row(result, item["labels"])})
        if not previews:
            z, ref = item["z"], item["labels"].array
            previews = {"labels": pred.array[z].astype(np.float32),
                        "errors": (pred.array[z] != ref[z]).astype(np.float32)}
        ctx.progress.advance()
    ctx.progress.close()
    keys = [k for k in rows[0] if k != "case"]
    table = {k: _mean([r.get(k) for r in rows]) for k in keys}
    return Evaluation({ctx.data.name: table}, float(np.median(seconds)), previews, {"per_case": rows})


def write_reference(ctx: Context) -> None:
    """The figure's first row: the first test case's FLAIR and its reference label map."""
    item = held_out(ctx)[0]
    z = item["z"]
    ctx.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(ctx.out / "reference.npz", FLAIR=item["inputs"][CHANNELS.index("FLAIR")].array[z],
                        labels=item["labels"].array[z].astype(np.float32))


# ---- diffusion ------------------------------------------------------------------------------------

def _fit_diffusion(ctx: Context, folder: Path, patch: list[int] | None = None, lr: float | None = None,
                   **task: Any) -> dict[str, Any]:
    """The bundled recipe at the study's budget; `task` overrides its "task" settings, `patch` its crop,
    `lr` its learning rate."""
    settings = budget_recipe(ctx, RECIPE, QUICK_NETWORK, **task)
    if lr is not None:
        settings["train"] = {**settings["train"], "lr": lr}
    if patch is not None:     # the same steps; the safety stop scaled with the crop's area
        settings["patch"] = patch
        area = np.prod(patch) / np.prod(RECIPE["patch"])
        settings["train"] = {**settings["train"], "time_limit_s": ctx.budget.time_limit_s * float(area)}
    card = train(TASK, ctx.data.train_dir, folder / "model", device=str(ctx.device), settings=settings,
                 progress=ctx.progress, resume=True)
    return budget_used(card.training)


def _model_segmenter(ctx: Context, model: str | Path, **options: Any) -> Callable[[list[Volume]], RunResult]:
    return lambda inputs: api.segment(inputs, model, device=str(ctx.device), **options)


def _eval_diffusion(ctx: Context, folder: Path) -> Evaluation:
    return _evaluate(ctx, _model_segmenter(ctx, folder / "model", ensemble=1))


def _ensemble(shared_method: str, fit: Callable[[Context, Path], dict[str, Any]]):
    """Five draws of another row's model (trained there first if that row has not run)."""
    def evaluate(ctx: Context, folder: Path) -> Evaluation:
        shared = ctx.out / shared_method
        if not (shared / "trained.json").is_file():
            write_json(shared / "trained.json", fit(ctx, shared))
        evaluation = _evaluate(ctx, _model_segmenter(ctx, shared / "model", ensemble=5))
        evaluation.extra["training"] = json.loads((shared / "trained.json").read_text(encoding="utf-8"))
        return evaluation
    return evaluate


def _eval_bundled(ctx: Context, folder: Path) -> Evaluation:
    card = read_card(resolve_model(BUNDLED))
    if card.labels != {"background": 0, **_labels(ctx)} or not set(card.inputs) <= set(ctx.data.train.channels):
        return Evaluation({}, extra={"skipped": f"{BUNDLED} segments other labels than this data set's"})
    return _evaluate(ctx, _model_segmenter(ctx, BUNDLED))


# ---- learned baselines ---------------------------------------------------------------------------

def dice_ce_loss() -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """MONAI DiceCELoss (softmax, batch Dice) against the one-hot target; with deep supervision
    (DynUNet in training: (B, heads, C, H, W)) the heads' losses weighted 1/2^i as nnU-Net does."""
    from monai.losses import DiceCELoss
    dice_ce = DiceCELoss(softmax=True, batch=True)

    def loss(pred: torch.Tensor, batch: Any) -> torch.Tensor:
        target = (batch.target.to(pred.device) + 1.0) / 2.0
        if pred.ndim == target.ndim + 1:
            w = 0.5 ** torch.arange(pred.shape[1], dtype=torch.float32)
            w = w / w.sum()
            return sum(float(wi) * dice_ce(pred[:, i], target) for i, wi in enumerate(w))
        return dice_ce(pred, target)
    return loss


def nnunet_augment(seed: int = 0) -> Callable[[Any, torch.Generator], Any]:
    """nnU-Net's data augmentation as far as it is cheap on 2D crops (MONAI transforms, nnU-Net's
    probabilities): the label map moves with the image (nearest neighbour); outside: background."""
    from monai.transforms import (Compose, RandAdjustContrastd, RandAffined, RandFlipd, RandGaussianNoised,
                                  RandGaussianSmoothd, RandScaleIntensityd, RandSimulateLowResolutiond)
    from monai.utils import convert_to_tensor
    image, label = "image", "label"
    transform = Compose([
        RandAffined([image, label], prob=0.3, rotate_range=math.pi / 6, scale_range=0.3,
                    mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandGaussianNoised(image, prob=0.1, std=0.05),
        RandGaussianSmoothd(image, prob=0.2, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0)),
        RandScaleIntensityd(image, prob=0.15, factors=0.25),
        RandSimulateLowResolutiond(image, prob=0.25, zoom_range=(0.5, 1.0), upsample_mode="bilinear"),
        RandAdjustContrastd(image, prob=0.3, gamma=(0.7, 1.5)),
        RandFlipd([image, label], prob=0.5, spatial_axis=0),
        RandFlipd([image, label], prob=0.5, spatial_axis=1),
    ])
    transform.set_random_state(seed)

    def augment(batch: Any, generator: torch.Generator) -> Any:
        conds, targets = [], []
        n = batch.target.shape[1]
        for c, t in zip(batch.cond, batch.target):
            # images shifted so that background is 0 (the transforms' padding value)
            d = transform({image: c + 1.0, label: t.argmax(0, keepdim=True).float()})
            conds.append(convert_to_tensor(d[image], track_meta=False).float() - 1.0)
            lab = convert_to_tensor(d[label], track_meta=False).round().long()[0]
            targets.append(torch.nn.functional.one_hot(lab, n).permute(2, 0, 1).float() * 2.0 - 1.0)
        return type(batch)(torch.stack(targets), torch.stack(conds), batch.labels)
    return augment


def _channels(card: ModelCard) -> dict[str, int]:
    return {"in_channels": len(card.inputs), "out_channels": len(card.labels)}


def _spec(kind: str, quick: bool, card: ModelCard) -> dict[str, Any]:
    if kind == "dynunet":
        s = dict(NNUNET[quick])
        levels = len(s["filters"])
        return {**_channels(card), **s, "kernel_size": [3] * levels, "upsample_kernel_size": s["strides"][1:],
                "deep_supervision": True}
    if kind == "swin-unetr":
        return {**_channels(card), **SWIN[quick]}
    return {**_channels(card), **SEGNET[quick]}


def factor(kind: str, spec: dict[str, Any]) -> int:
    """The down-sampling factor the network's input sizes must be multiples of."""
    if kind == "swin-unetr":
        return 32                                   # patch 2, four 2x patch mergings
    return int(np.prod(spec["strides"]))


def _baseline_fit(kind: str, quick: bool):
    def fit(ctx: Context, folder: Path) -> dict[str, Any]:
        card = _card(ctx)
        augment = nnunet_augment() if kind == "dynunet" else None
        return fit_supervised(ctx, folder, card, kind, _spec(kind, quick, card), dice_ce_loss(), label=kind,
                              augment=augment, train={"lr": LR})
    return fit


def _pipeline_segmenter(ctx: Context, network: torch.nn.Module, factor_: int,
                        windows: bool = False) -> Callable[[list[Volume]], RunResult]:
    """A network of class scores (logits, or one-hot for the floor) run by the task's own pipeline;
    `windows`: by sliding windows of the training crop (AsX0)."""
    card = one_step_card(_card(ctx))
    task = get_task(TASK)
    wrapped = AsX0(network, noisy_channels=len(card.labels), post=lambda out: torch.softmax(out, 1) * 2.0 - 1.0,
                   factor=factor_, window=tuple(card.patch) if windows else None).eval()

    def run(inputs: list[Volume]) -> RunResult:
        options = RunOptions(device=str(ctx.device)).with_card_defaults(card)
        with torch.inference_mode():
            return task.run(card, wrapped, inputs, options, Progress(), ctx.device)
    return run


def _eval_baseline(ctx: Context, folder: Path) -> Evaluation:
    net, meta = load_baseline(folder, ctx.device)
    return _evaluate(ctx, _pipeline_segmenter(ctx, net, factor(meta["kind"], meta["spec"]), windows=True))


# ---- the real nnU-Net ------------------------------------------------------------------------------

def _fit_nnunet(ctx: Context, folder: Path) -> dict[str, Any]:
    """nnU-Net's own planning, preprocessing and trainer on the study's training subjects and budget."""
    card = _card(ctx)
    work = folder / "nnunetv2"
    if not (work / "raw" / nnunet.DATASET / "dataset.json").is_file():
        cases = [(c.id, [c.read(ch) for ch in card.inputs], c.read_label()) for c in ctx.data.train_cases]
        nnunet.write_raw(work, cases, list(card.inputs), dict(card.labels))
    b = ctx.budget
    ctx.progress.start("nnU-Net: plan, preprocess, train", 1)
    nnunet.run_stage("train", work, {"steps": b.steps, "batch_size": b.batch_size, "device": str(ctx.device)})
    ctx.progress.close()
    return json.loads((work / "train_done.json").read_text(encoding="utf-8"))


def _eval_nnunet(ctx: Context, folder: Path) -> Evaluation:
    """nnU-Net's predictor on the test cases (in one child process); the seconds are its own per case."""
    from ..tasks.segment import entropy
    card = _card(ctx)
    work = folder / "nnunetv2"
    cases = held_out(ctx)
    nnunet.write_raw(work, [(item["id"], item["inputs"], None) for item in cases], list(card.inputs), {}, part="Ts")
    ctx.progress.start("nnU-Net: predict", 1)
    nnunet.run_stage("predict", work, {"device": str(ctx.device), "cases": [item["id"] for item in cases],
                                       "threads": torch.get_num_threads()})
    ctx.progress.close()
    labels = nnunet.label_order(card.labels)                              # nnU-Net's channel order
    values = np.array(list(labels.values()))
    stored = {item["id"]: np.load(work / "predictions" / f"{item['id']}.npz") for item in cases}

    def segment(inputs: list[Volume]) -> RunResult:
        found = next(item["id"] for item in cases if item["inputs"] is inputs)
        p, ref = stored[found]["probabilities"], inputs[0]
        return RunResult({"output": ref.with_array(values[stored[found]["labels"]].astype(np.uint8)),
                          "uncertainty": ref.with_array(entropy(p))}, {"labels": labels}, {"probabilities": p})
    evaluation = _evaluate(ctx, segment)
    evaluation.seconds_per_volume = float(np.median([float(s["seconds"]) for s in stored.values()]))
    return evaluation


# ---- the floor: nearest tissue centroid ------------------------------------------------------------

class NearestCentroid(torch.nn.Module):
    """Each voxel's label is that of the nearest class mean of the normalised intensities; returns
    large logits of that label (softmax ~ one-hot). A 3-line argmin: scikit-learn's NearestCentroid
    would add a dependency and leave the task's pipeline."""

    def __init__(self, centroids: torch.Tensor):
        super().__init__()
        self.register_buffer("centroids", centroids)          # (K, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = ((x[:, None] - self.centroids[None, :, :, None, None]) ** 2).sum(2)
        return torch.nn.functional.one_hot(d.argmin(1), len(self.centroids)).permute(0, 3, 1, 2).float() * 50.0


def centroids(card: ModelCard, ctx: Context, cases: list[Case]) -> np.ndarray:
    """Per label (card order): the mean normalised intensity vector of the training voxels; a label
    without training voxels gets a centroid no voxel is near."""
    sums = np.zeros((len(card.labels), len(card.inputs)))
    counts = np.zeros(len(card.labels))
    for c in get_task(TASK).training_cases(card, ctx.data.train, cases):
        lab = c.target.argmax(0).ravel()
        values = c.cond.reshape(len(card.inputs), -1)
        for k in range(len(card.labels)):
            sums[k] += values[:, lab == k].sum(axis=1)
            counts[k] += (lab == k).sum()
    return np.where(counts[:, None] > 0, sums / np.maximum(counts[:, None], 1), 1e6).astype(np.float32)


def _eval_centroid(ctx: Context, folder: Path) -> Evaluation:
    card = _card(ctx)
    means = centroids(card, ctx, ctx.data.train_cases)
    evaluation = _evaluate(ctx, _pipeline_segmenter(ctx, NearestCentroid(torch.from_numpy(means)).to(ctx.device), 1))
    evaluation.extra["centroids"] = {name: means[i].tolist() for i, name in enumerate(card.labels)}
    return evaluation


def _lr_rows(suffix: str, lr: float) -> list[Method]:
    """The recipe at another learning rate: one draw, and five draws of the same model."""
    fit, name = partial(_fit_diffusion, lr=lr), f"diffusion-{suffix}"
    return [Method(name, f"Diffusion, learning rate {lr:g}, ensemble 1", "diffusion", _eval_diffusion, fit),
            Method(f"{name}-ens5", f"Diffusion, learning rate {lr:g}, ensemble 5", "diffusion", _ensemble(name, fit),
                   note=f"the {name} model, 5 draws")]


def methods(quick: bool) -> list[Method]:
    out = [
        Method("diffusion", "Diffusion (x0, 4 Fast-DDPM steps), ensemble 1", "diffusion", _eval_diffusion,
               _fit_diffusion),
        Method("diffusion-ens5", "Diffusion, ensemble 5", "diffusion", _ensemble("diffusion", _fit_diffusion),
               note="the ensemble-1 model, 5 draws"),
        Method("diffusion-mirror", "Diffusion trained on mirrored crops, ensemble 1", "diffusion", _eval_diffusion,
               partial(_fit_diffusion, mirror=True)),
        Method("diffusion-mirror-ens5", "Diffusion trained on mirrored crops, ensemble 5, test-time mirroring",
               "diffusion", _ensemble("diffusion-mirror", partial(_fit_diffusion, mirror=True)),
               note="the diffusion-mirror model, 5 draws, the 2nd and 4th of the mirrored input"),
        Method("diffusion-wide", "Diffusion trained on whole-slice crops (104 x 88), ensemble 1",
               "diffusion", _eval_diffusion, partial(_fit_diffusion, patch=WIDE_PATCH)),
        Method("diffusion-wide-ens5", "Diffusion trained on whole-slice crops, ensemble 5", "diffusion",
               _ensemble("diffusion-wide", partial(_fit_diffusion, patch=WIDE_PATCH)),
               note="the diffusion-wide model, 5 draws"),
        *(row for suffix, lr in FAST_LRS.items() for row in _lr_rows(suffix, lr)),
        Method("diffusion-dice-ce", "Diffusion + Dice-CE on the x0 prediction, ensemble 1", "diffusion",
               _eval_diffusion, partial(_fit_diffusion, dice_ce=DICE_CE)),
        Method("diffusion-bundled", f"Diffusion, bundled {BUNDLED}", "diffusion", _eval_bundled, note=bundled_note(BUNDLED)),
        *([Method("nnunetv2", "nnU-Net (nnunetv2, 2D configuration)", "learned", _eval_nnunet, _fit_nnunet)]
          if nnunet.available() is None else []),
        Method("nnunet", "nnU-Net stand-in (MONAI DynUNet)", "learned", _eval_baseline, _baseline_fit("dynunet", quick)),
        Method("swin-unetr", "SwinUNETR (VT-UNet stand-in)", "learned", _eval_baseline,
               _baseline_fit("swin-unetr", quick)),
        Method("segnet", "Encoder-decoder without skips (SegNet stand-in, MONAI AutoEncoder)", "learned",
               _eval_baseline, _baseline_fit("autoencoder", quick)),
        Method("centroid", "Nearest tissue centroid (intensities)", "floor", _eval_centroid),
    ]
    # the quick study proves the wiring; a row differing only in its learning rate adds nothing there
    return [m for m in out if not (quick and m.name.startswith("diffusion-lr"))]
