"""Anomaly-detection study (the survey's Table 13): AnoDDPM-style diffusion with simplex and with
Gaussian noise against autoencoder and VAE reconstruction of healthy anatomy, the FLAIR intensity
itself as the anomaly map (the floors: raw, negated, |z-score|), and a supervised ResNet lesion
classifier for the volume-level view, on held-out phantom subjects with and without lesions; one
table per lesion kind of the phantom (hyper, iso, hypo, tumour: `phantom.LESION_KINDS`)."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from .. import api
from ..datasets import Case, read_dataset
from ..engine.batches import TrainingCase, random_batches
from ..engine.inference import infer_slices, windowed
from ..engine.pipeline import train
from ..engine.space import ModelSpace, robust_scale, to_unit
from ..engine.trainer import Batch
from ..metrics import detection_metrics
from ..models import ModelCard, read_card, resolve_model
from ..progress import Progress
from ..atlas import SLACK, SMOOTH, TissueAtlas
from ..registration import affine, carry
from ..tasks import get_task
from ..tasks.anomaly import PHANTOM_LESION, TOP_FRACTION, Reconstruct, brain_mask, lesion_reference, top_mean
from ..volume import Volume, onto_grid
from .core import (PHANTOM_TEST_SEED, Context, Evaluation, Method, budget_recipe, budget_used, bundled_note,
                   write_json)
from .learners import SupervisedTrainer, fit_supervised, load_baseline
from .segment import cut_slab, largest_slice

TASK = "anomaly"
CHANNELS = ["FLAIR"]
JOINT = ["T1", "T2", "FLAIR"]           # the joint multi-contrast diffusion model's channels
REQUIRED_CHANNELS = JOINT
BUNDLED = "brain-mri-anomaly"
QUICK_DEPTH = 8                       # quick studies: this many axial slices per test volume
TOP_SLICES = 3                        # the ResNet's volume score: mean of its top-3 slice probabilities
HEALTHY_TEST_SEED = PHANTOM_TEST_SEED + 1          # held-out healthy subjects (--lesions 0)
VALIDATION_SEEDS = (9101, 9102)                    # validation subjects: with lesions, healthy
KINDS = ("hyper", "iso", "hypo", "tumour")         # phantom: one held-out benchmark (table) per lesion kind
COLUMNS = [("voxel_auroc", "AUROC (voxel)", "higher"), ("voxel_auprc", "AUPRC", "higher"),
           ("best_dice", "best Dice", "higher"), ("val_dice", "Dice @ val. threshold", "higher"),
           ("healthy_above", "healthy voxels above val. threshold (%)", "lower"),
           ("volume_auroc", "AUROC (volume)", "higher"), ("top1_error", "Top-1 error (volume)", "lower"),
           ("region_auroc", "AUROC (volume, largest region)", "higher"),
           ("alarm_dice", "Dice @ 0.1 % val. false alarms", "higher"),
           ("alarm_healthy_above", "healthy voxels above that (%)", "lower")]
FALSE_ALARMS = 0.001      # the second operating point: this fraction of healthy validation voxels above it
ANCHOR = "T1"               # the contrast a case is registered to the cohort on
SEGMENTER = "brain-mri-lesion-segment"   # the tissue-atlas row's (DiffusionMICLib.atlas)
SEGMENTER_EXTRA = ["PD"]    # its inputs beyond JOINT
NOTES = [
    "Test set, one table per lesion kind (`diffusion-mic phantom --lesion-kind`): the held-out phantom "
    "subjects with lesions of that kind (seed 9001; hyper, iso and hypo lesions lie in the same places, "
    "tumour subjects hold one mass with oedema, necrosis and mass effect) and the same healthy held-out "
    f"subjects in every table (seed {HEALTHY_TEST_SEED}, --lesions 0), same noise. Every label from 4 up is "
    "abnormal. Voxel metrics are pooled over all of them inside each subject's brain (Otsu foreground of "
    "FLAIR, holes filled, plus the lesions): a map that lights up healthy brains pays for it. Best Dice is "
    "the best over all thresholds (optimistic); 'healthy voxels above' is the percentage of the healthy test "
    "subjects' voxels at or above the validation threshold (false alarms; issue 11's goal: at most 0.1 %). "
    "Every model trains on healthy (or, ResNet, hyper-lesion) "
    "data only: the other kinds are new to all of them.",
    f"Validation: separate phantom subjects (seeds {VALIDATION_SEEDS[0]} with lesions and "
    f"{VALIDATION_SEEDS[1]} healthy, half as many as the test subjects, at least one each) that no method "
    "trains on. The voxel threshold (best Dice there) gives 'Dice @ val. threshold' on the test set; the "
    "volume threshold (fewest errors there) gives the Top-1 error. A user data set: the training cases "
    "are the validation cases (the healthy ones also trained the reconstruction models).",
    "Volume level: AUROC of each subject's score (maps: the mean of its top 0.1 % of map values in the "
    f"eroded brain, the task's score; ResNet: the mean of its top {TOP_SLICES} slice probabilities) "
    "between healthy and lesioned subjects, and Top-1 error = the fraction misclassified at the "
    "validation threshold. With two classes Top-5 is meaningless (always 0) and is not reported. 'Largest "
    "region': the same AUROC with a map's volume score taken as the volume of its largest connected "
    "(6-neighbour) region at or above the voxel threshold chosen on validation (the largest lesion the map "
    "marks: a few scattered false-alarm voxels do not add up to it; no setting of its own).",
    f"A second voxel threshold, set for false alarms instead of Dice (as a deployed detector is set): the "
    f"{100 * (1 - FALSE_ALARMS):g}th percentile of the healthy validation subjects' map values in their brains, "
    f"so that {100 * FALSE_ALARMS:g} % of healthy validation voxels lie above it (issue 11's goal); 'Dice @ "
    f"{100 * FALSE_ALARMS:g} % val. false alarms' and 'healthy voxels above that' are the test set's at it.",
    "Every map is made by the anomaly task's own code: |FLAIR - reconstruction| in its normalised units "
    "(foreground median -> 0.5), Gaussian-smoothed (2 mm), zero outside the brain eroded by 2 mm. "
    f"The joint diffusion model learns healthy {', '.join(JOINT)} together (one 3-channel image) and its map "
    "is the residual averaged over the three channels. "
    "AE/VAE: MONAI AutoEncoder / VarAutoEncoder (KL weight 1e-3) trained on the training subjects' "
    "healthy FLAIR (healthyTr) 64 x 64 crops like the diffusion models, run by 64 x 64 sliding windows. "
    "FLAIR floors, through the same smoothing and masking: raw (the reconstruction is the background value, "
    "so the map is the smoothed intensity), negated (the volume's maximum minus the intensity: dark lesions) "
    "and |z-score| (the distance from the brain's median intensity: bright or dark).",
    "Normative rows: a cohort of healthy acquired phantom subjects (seed 9201, --lesions 0; 8 in the full "
    "study) that nothing trains or is tested on gives, per voxel, the mean and standard deviation of a map "
    "(each smoothed by 1 voxel; the deviation floored at half its median in the brain), resampled onto each "
    "case's grid; the map becomes its per-voxel z-score: max(z, 0) for reconstruction residuals (only "
    "larger than normal), |z| for intensities (the normative floors), averaged over the contrasts of a "
    "joint row. This needs the subjects in one space (the phantom's subjects are warps of one anatomy on "
    "one grid; real scans would be registered to an atlas first, as normative modelling does). The "
    "diffusion rows reuse the diffusion-gaussian and diffusion-joint models. 'Registered' rows first register "
    f"each cohort subject to each case (affine, {ANCHOR} onto {ANCHOR}, mean squares; DiffusionMICLib.registration) "
    "and carry the cohort's maps through it, as an atlas-based normative model would.",
    f"Tissue atlas: the bundled diffusion segmenter {SEGMENTER} (T1, T2, PD, FLAIR; trained on the training "
    "subjects with hyperintense lesions labelled, so that table is not unsupervised for it) gives each voxel's "
    "class probabilities; the registered cohort's, averaged and max-filtered over "
    f"{SLACK} voxels, say where each tissue may be; the map is the sum over tissues of how far the case's "
    f"probability exceeds that, smoothed by {SMOOTH} voxels, zero outside the brain eroded by 1 voxel: "
    "tissue out of place (grey matter inside white matter, lesion, CSF where there is none), whatever its "
    "intensity (DiffusionMICLib.atlas; for a user's own cohort: `diffusion-mic run anomaly --healthy DIR`).",
    "ResNet: MONAI ResNet-10 (2D) trained to tell 64 x 64 crops of the training subjects' acquired FLAIR "
    "that hold a lesion voxel from those that do not (half the crops centred on lesions, binary "
    "cross-entropy, left-right flips); a slice's probability is the largest of its 64 x 64 tiles' "
    "(stride 32). It gives no voxel map. (Whole-slice training on 3 subjects learned their anatomy, "
    "not the lesions: held-out slice AUROC 0.26.)",
]

# The recipe of the bundled brain-mri-anomaly (Resources/Models/brain-mri-anomaly/train.json) with the
# study's budget; no threshold calibration after training (the study chooses thresholds on validation).
# The noise is each row's: the bundled model was retrained with the diffusion-gaussian row's (2026-12-03).
RECIPE: dict[str, Any] = {
    "task": {"channels": CHANNELS},
    "patch": [64, 64],
    "defaults": {"calibration_cases": 0},
    "train": {"lr": 1e-3, "lr_schedule": "cosine", "ema_decay": 0.995, "ema_start": 20, "seed": 102},
}
QUICK_NETWORK = {"channels": [16, 32], "attention_levels": [False, False], "norm_num_groups": 16}
GAUSSIAN = {"noise": {"type": "gaussian"}}
# pDDPM-style masking (tasks/anomaly.py): 16-voxel (32 mm) boxes redrawn from their surroundings, on the
# joint contrasts, Gaussian noise (pDDPM's; it also beat simplex on FLAIR here).
MASKED = {"channels": JOINT, "masked": {"box": 16}, **GAUSSIAN}

# Baseline networks (learners.network specs): full, quick.
AE = ({"channels": (32, 64, 128), "strides": (2, 2, 2), "num_res_units": 1},
      {"channels": (8, 16, 32), "strides": (2, 2, 2)})
VAE = ({"channels": (32, 64, 128), "strides": (2, 2, 2), "latent_size": 128, "num_res_units": 1},
       {"channels": (8, 16, 32), "strides": (2, 2, 2), "latent_size": 32})
RESNET = ({"block_inplanes": [32, 64, 128, 256]}, {"block_inplanes": [8, 16, 32, 64]})
KL_WEIGHT = 1e-3
# Measured (quick ResNet, batch 8, 3 training subjects): held-out slice AUROC 0.74 after 300 steps at
# lr 1e-3, 0.85 at 3e-3.
RESNET_LR = 3e-3
# Normative rows: a healthy cohort (--lesions 0, a seed no other part uses) gives each voxel's normal map
# value and spread; full, quick.
NORMATIVE_SEED = 9201
NORMATIVE_SUBJECTS = (8, 2)


def _card(ctx: Context) -> ModelCard:
    return get_task(TASK).make_card(ctx.data.train, budget_recipe(ctx, RECIPE, QUICK_NETWORK))


# ---- the cases (the same for every method) --------------------------------------------------------

def _phantom(ctx: Context, part: str, seed: int, n: int, lesions: int, kind: str = "hyper") -> list[Case]:
    """Extra phantom subjects beside the runner's (same resolution and noise), written once."""
    from ..phantom import write_phantom
    src = ctx.data.source
    where = ctx.out.parent / "data" / f"phantom-{part}-seed{seed}-n{n}"
    if not (where / "dataset.json").is_file():
        write_phantom(where, subjects=n, seed=seed, resolution=src["resolution_mm"], noise=src["noise_percent"],
                      lesions=lesions, lesion_kind=kind)
    src[part] = {"seed": seed, "subjects": n, "lesions": lesions, "lesion_kind": kind}
    return read_dataset(where).cases


def _channels(ctx: Context) -> list[str]:
    """The contrasts every case is read with: JOINT, and PD where the data has it (the segmenter's)."""
    return [*JOINT, *[ch for ch in SEGMENTER_EXTRA if ch in ctx.data.train.channels]]


def _item(ctx: Context, case: Case, part: str) -> dict[str, Any]:
    """FLAIR, lesion reference, scored voxels and preview slice of one case (quick: a slab)."""
    names = _channels(ctx)
    images, label = [case.read(ch) for ch in names], case.read_label()
    flair = images[JOINT.index("FLAIR")]
    value = ctx.data.train.labels.get("lesion")
    if ctx.data.source.get("kind") == "phantom":
        lesion = label.array >= PHANTOM_LESION                  # every lesion kind, tumour parts included
    else:
        lesion = label.array == value if value is not None else lesion_reference(label)
    brain = brain_mask(flair.array[None].astype(np.float32)) | lesion
    z = largest_slice(lesion if lesion.any() else brain)
    volumes = [label.with_array(lesion.astype(np.uint8)), label.with_array(brain.astype(np.uint8)), *images]
    slices = (0, flair.array.shape[0])
    if ctx.quick:
        centre = z
        volumes, z = cut_slab(volumes, z, QUICK_DEPTH)
        slices = (centre - z, centre - z + QUICK_DEPTH)
    channels = dict(zip(names, volumes[2:]))
    return {"id": case.id, "key": f"{part}/{case.id}", "test": part.startswith("test"), "channels": channels,
            "lesion": volumes[0], "mask": volumes[1], "z": z, "slices": slices,
            "anomalous": bool(volumes[0].array.any())}


def benchmark_name(ctx: Context, kind: str) -> str:
    return f"{ctx.data.name}, {kind}" + (" lesions" if kind != "tumour" else "")


def cases(ctx: Context) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Per benchmark (table name): {"test": lesioned + healthy held-out cases, "validation": lesioned +
    healthy validation cases}. The healthy cases are the same items in every benchmark."""
    if "cases" in ctx.cache:
        return ctx.cache["cases"]
    n_test, n_val = ctx.budget.test_subjects, max(1, ctx.budget.test_subjects // 2)
    benches = {}
    if ctx.data.source.get("kind") == "phantom":
        healthy = {"test": [_item(ctx, c, "test-healthy")
                            for c in _phantom(ctx, "test-healthy", HEALTHY_TEST_SEED, n_test, 0)],
                   "validation": [_item(ctx, c, "validation-healthy")
                                  for c in _phantom(ctx, "validation-healthy", VALIDATION_SEEDS[1], n_val, 0)]}
        for kind in KINDS:
            tag = "" if kind == "hyper" else f"-{kind}"
            test = ctx.data.test if kind == "hyper" else _phantom(ctx, f"test{tag}", PHANTOM_TEST_SEED, n_test, 3,
                                                                   kind)
            validation = _phantom(ctx, f"validation{tag}", VALIDATION_SEEDS[0], n_val, 3, kind)
            benches[benchmark_name(ctx, kind)] = {
                "test": [_item(ctx, c, f"test{tag}") for c in test] + healthy["test"],
                "validation": [_item(ctx, c, f"validation{tag}") for c in validation] + healthy["validation"]}
    else:
        benches[ctx.data.name] = {"test": [_item(ctx, c, "test") for c in ctx.data.test],
                                  "validation": [_item(ctx, c, "validation") for c in ctx.data.train_cases
                                                 if c.label is not None]}
    ctx.cache["cases"] = benches
    return benches


# ---- evaluation --------------------------------------------------------------------------------------

# {channel: volume} of a case -> (anomaly map or None, volume score)
Detector = Callable[[dict[str, Volume]], tuple[Volume | None, float]]


def best_cut(scores: list[float], truth: list[bool]) -> float:
    """The score threshold (midway between neighbouring scores) with the fewest errors of score > t."""
    s = np.sort(np.asarray(scores, np.float64))
    cuts = np.r_[s[0] - 1.0, (s[:-1] + s[1:]) / 2.0, s[-1] + 1.0]
    errors = [np.mean((np.asarray(scores) > c) != np.asarray(truth)) for c in cuts]
    return float(cuts[int(np.argmin(errors))])


def dice_at(maps: list[Volume], items: list[dict[str, Any]], threshold: float) -> float | None:
    """Dice of map >= threshold against the lesions, pooled over the cases inside their masks."""
    tp = pred = ref = 0
    for m, item in zip(maps, items):
        inside = item["mask"].array > 0
        p, r = m.array[inside] >= threshold, item["lesion"].array[inside] > 0
        tp, pred, ref = tp + int((p & r).sum()), pred + int(p.sum()), ref + int(r.sum())
    return 2.0 * tp / (pred + ref) if pred + ref else None


def _healthy_values(maps: list[Volume], items: list[dict[str, Any]]) -> np.ndarray | None:
    """The healthy cases' map values inside their masks (the scored voxels), pooled; None without any."""
    healthy = [m.array[i["mask"].array > 0] for m, i in zip(maps, items) if not i["anomalous"]]
    return np.concatenate(healthy) if healthy else None


def healthy_above(maps: list[Volume], items: list[dict[str, Any]], threshold: float | None) -> float | None:
    """Percent of the healthy cases' scored voxels with map >= threshold (false alarms), pooled."""
    values = _healthy_values(maps, items)
    if threshold is None or values is None:
        return None
    return 100.0 * int((values >= threshold).sum()) / values.size


def false_alarm_threshold(maps: list[Volume], items: list[dict[str, Any]], fraction: float) -> float | None:
    """The map value that `fraction` of the healthy cases' scored voxels exceed (pooled); None without any."""
    values = _healthy_values(maps, items)
    return None if values is None else float(np.quantile(values, 1.0 - fraction))


def largest_region(m: Volume, threshold: float) -> float:
    """The volume (mL) of the largest connected (6-neighbour) region of map >= threshold; 0 if none."""
    parts, n = ndimage.label(m.array >= threshold)
    return float(np.bincount(parts.ravel())[1:].max()) * float(np.prod(m.geometry.spacing)) / 1000.0 if n else 0.0


def volume_auroc(scores: list[float], truth: list[bool]) -> float | None:
    from monai.metrics import compute_roc_auc
    if all(truth) or not any(truth):
        return None
    return float(compute_roc_auc(torch.tensor(scores, dtype=torch.float64), torch.tensor(truth, dtype=torch.long)))


def _evaluate(ctx: Context, detect: Detector) -> Evaluation:
    """Detect once on every case of every benchmark, then score each benchmark (one table each)."""
    benches = cases(ctx)
    unique = {item["key"]: item for bench in benches.values() for items in bench.values() for item in items}
    results: dict[str, tuple[Volume | None, float]] = {}
    seconds = []
    ctx.progress.start("evaluate", len(unique))
    for key, item in unique.items():
        t0 = time.perf_counter()
        results[key] = detect(item["channels"])
        if item["test"]:
            seconds.append(time.perf_counter() - t0)
        ctx.progress.advance()
    ctx.progress.close()
    tables, thresholds, previews = {}, {}, {}
    for name, bench in benches.items():
        tables[name], thresholds[name], shown = _score(bench, results)
        previews = previews or shown
    scores = {k: results[k][1] for k, i in unique.items() if i["test"]}     # "test-healthy/phantom_000": ...
    return Evaluation(tables, float(np.median(seconds)), previews, {"scores": scores, "thresholds": thresholds})


def _score(bench: dict[str, list[dict[str, Any]]], results: dict[str, tuple[Volume | None, float]]):
    """One benchmark's row, its thresholds and (for the figure) previews of its first lesioned case."""
    test, val = bench["test"], bench["validation"]
    out = {part: [results[i["key"]] for i in bench[part]] for part in ("test", "validation")}
    truth = [i["anomalous"] for i in test]
    scores = [s for _, s in out["test"]]
    val_truth = [i["anomalous"] for i in val]
    cut = best_cut([s for _, s in out["validation"]], val_truth) if len(set(val_truth)) == 2 else None
    row: dict[str, float | None] = {k: None for k, _, _ in COLUMNS}
    row["volume_auroc"] = volume_auroc(scores, truth)
    if cut is not None:
        row["top1_error"] = float(np.mean((np.asarray(scores) > cut) != np.asarray(truth)))
    thresholds: dict[str, float | None] = {"volume": cut}
    previews: dict[str, np.ndarray] = {}
    maps = [m for m, _ in out["test"]]
    if all(m is not None for m in maps):
        voxel = detection_metrics(maps, [i["lesion"] for i in test], [i["mask"] for i in test])
        row.update({k: voxel[k] for k in ("voxel_auroc", "voxel_auprc", "best_dice")})
        lesioned = [(m, i) for (m, _), i in zip(out["validation"], val) if i["anomalous"]]
        threshold = detection_metrics([m for m, _ in lesioned], [i["lesion"] for _, i in lesioned],
                                      [i["mask"] for _, i in lesioned])["best_dice_threshold"] if lesioned else None
        row["val_dice"] = dice_at(maps, test, threshold) if threshold is not None else None
        row["healthy_above"] = healthy_above(maps, test, threshold)
        if threshold is not None:
            row["region_auroc"] = volume_auroc([largest_region(m, threshold) for m in maps], truth)
        thresholds["voxel"] = threshold
        alarm = false_alarm_threshold([m for m, _ in out["validation"]], val, FALSE_ALARMS)
        if alarm is not None:
            row["alarm_dice"], row["alarm_healthy_above"] = dice_at(maps, test, alarm), healthy_above(maps, test, alarm)
        thresholds["false_alarms"] = alarm
        first = next((k for k, i in enumerate(test) if i["anomalous"]), 0)
        healthy = next((k for k, i in enumerate(test) if not i["anomalous"]), None)
        z = test[first]["z"]
        previews["anomaly map"] = maps[first].array[z]
        if threshold is not None:
            previews["errors"] = ((maps[first].array[z] >= threshold) != (test[first]["lesion"].array[z] > 0)
                                  ).astype(np.float32)
        if healthy is not None:
            previews["healthy map"] = maps[healthy].array[test[healthy]["z"]]
    return row, thresholds, previews


def write_reference(ctx: Context) -> None:
    """The figure's first row: a lesioned and a healthy test FLAIR, and the reference lesions."""
    test = next(iter(cases(ctx).values()))["test"]
    first = next((i for i in test if i["anomalous"]), test[0])
    refs = {"FLAIR": first["channels"]["FLAIR"].array[first["z"]],
            "lesion": first["lesion"].array[first["z"]].astype(np.float32)}
    healthy = next((i for i in test if not i["anomalous"]), None)
    if healthy is not None:
        refs["healthy FLAIR"] = healthy["channels"]["FLAIR"].array[healthy["z"]]
    ctx.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(ctx.out / "reference.npz", **refs)


# ---- diffusion ------------------------------------------------------------------------------------

def _fit_diffusion(task: dict[str, Any] | None):
    def fit(ctx: Context, folder: Path) -> dict[str, Any]:
        card = train(TASK, ctx.data.train_dir, folder / "model", device=str(ctx.device),
                     settings=budget_recipe(ctx, RECIPE, QUICK_NETWORK, **(task or {})),
                     progress=ctx.progress, resume=True)
        return budget_used(card.training)
    return fit


def _model_detector(ctx: Context, model: str | Path) -> Detector:
    inputs = read_card(resolve_model(model)).inputs

    def detect(channels: dict[str, Volume]) -> tuple[Volume, float]:
        result = api.anomaly([channels[ch] for ch in inputs], model, device=str(ctx.device))
        return result.outputs["output"], float(result.info["score"])
    return detect


def _eval_diffusion(ctx: Context, folder: Path) -> Evaluation:
    return _evaluate(ctx, _model_detector(ctx, folder / "model"))


def _eval_bundled(ctx: Context, folder: Path) -> Evaluation:
    return _evaluate(ctx, _model_detector(ctx, BUNDLED))


# ---- reconstruction baselines (AE, VAE) and the FLAIR floor ----------------------------------------

class ReconstructionTrainer(SupervisedTrainer):
    """Learns to reproduce its input (healthy crops): loss(network(target), batch)."""

    def loss(self, batch: Batch) -> torch.Tensor:
        return self.supervised_loss(self.model(batch.target.to(self.device)), batch)


def reconstruction_loss(pred: Any, batch: Batch) -> torch.Tensor:
    """MSE to the input; for a VAE's (reconstruction, mu, logvar, z) plus KL_WEIGHT x the mean KL
    divergence of the latent from N(0, I)."""
    target = batch.target.to(pred[0].device if isinstance(pred, tuple) else pred.device)
    if not isinstance(pred, tuple):
        return torch.nn.functional.mse_loss(pred.float(), target)
    recon, mu, logvar, _ = pred
    kl = -0.5 * torch.mean(1 + logvar - mu.pow(2) - logvar.exp())
    return torch.nn.functional.mse_loss(recon.float(), target) + KL_WEIGHT * kl


def _reconstruction_spec(kind: str, quick: bool, card: ModelCard) -> dict[str, Any]:
    n = len(card.inputs)
    if kind == "autoencoder":
        return {"in_channels": n, "out_channels": n, **AE[quick]}
    return {"in_shape": [n, *card.patch], "out_channels": n, "use_sigmoid": False, "use_mean_at_inference": True,
            **VAE[quick]}


def _fit_reconstruction(kind: str, quick: bool):
    def fit(ctx: Context, folder: Path) -> dict[str, Any]:
        card = _card(ctx)
        return fit_supervised(ctx, folder, card, kind, _reconstruction_spec(kind, quick, card), reconstruction_loss,
                              trainer_cls=ReconstructionTrainer, label=kind)
    return fit


def network_reconstruction(net: torch.nn.Module, patch: list[int], device: torch.device) -> Reconstruct:
    """A trained (V)AE's reconstruction of whole slices by sliding windows of its training patch
    (engine.inference.windowed; a VAE's dense latent needs that size)."""
    def window(x: torch.Tensor) -> torch.Tensor:
        y = net(x)
        return y[0] if isinstance(y, tuple) else y

    def predict(c: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        with torch.inference_mode():
            return windowed(window, c.to(device), tuple(patch))

    def reconstruct(x: np.ndarray, crop: tuple[slice, ...]) -> Iterator[np.ndarray]:
        yield infer_slices(predict, x, x.shape[0], tuple(x.shape[1:]), factor=1, batch_size=16, crop=crop)
    return reconstruct


def _map_detector(card: ModelCard, reconstruct: Reconstruct) -> Detector:
    task = get_task(TASK)

    def detect(channels: dict[str, Volume]) -> tuple[Volume, float]:
        result = task.detect(card, [channels[ch] for ch in card.inputs], reconstruct, Progress())
        return result.outputs["output"], float(result.info["score"])
    return detect


def _eval_reconstruction(ctx: Context, folder: Path) -> Evaluation:
    net, _ = load_baseline(folder, ctx.device)
    card = _card(ctx)
    return _evaluate(ctx, _map_detector(card, network_reconstruction(net, card.patch, ctx.device)))


def _floor(variant: str) -> Reconstruct:
    """A constant "reconstruction" that turns |input - reconstruction| into an intensity floor: raw
    (the normalised background, -1), negated (the volume's maximum) or |z-score| (the brain's median;
    one scale per volume, so it ranks voxels as |z| does)."""
    def reconstruct(x: np.ndarray, crop: tuple[slice, ...]) -> list[np.ndarray]:
        if variant == "raw":
            value = -1.0
        elif variant == "negated":
            value = float(x.max())
        else:
            value = float(np.median(x[:, brain_mask(x + 1.0)]))
        return [np.full_like(x, value)]
    return reconstruct


def _eval_floor(variant: str):
    def evaluate(ctx: Context, folder: Path) -> Evaluation:
        return _evaluate(ctx, _map_detector(_card(ctx), _floor(variant)))
    return evaluate


# ---- normative maps: each voxel's value against healthy subjects' at the same place ------------------

def normative_cohort(ctx: Context) -> list[dict[str, Volume]]:
    """Healthy acquired subjects that nothing trains or is tested on: whole volumes, or in a quick study
    the axial slices that span every case's slab (the maps cost time per slice)."""
    if "normative" not in ctx.cache:
        n = NORMATIVE_SUBJECTS[ctx.quick]
        spans = [i["slices"] for bench in cases(ctx).values() for part in bench.values() for i in part]
        lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
        ctx.cache["normative"] = [{ch: Volume.from_sitk(c.read(ch).to_sitk()[:, :, lo:hi]) for ch in _channels(ctx)}
                                  for c in _phantom(ctx, "normative-healthy", NORMATIVE_SEED, n, 0)]
    return ctx.cache["normative"]


def voxel_statistics(maps: list[Volume]) -> tuple[Volume, Volume]:
    """Per voxel: the mean and standard deviation of maps on one grid, each smoothed by 1 voxel; the
    deviation floored at half its median over the voxels where any map is non-zero (a few subjects
    make some voxels' spread near zero)."""
    stack = np.stack([m.array.astype(np.float64) for m in maps])
    mean = ndimage.gaussian_filter(stack.mean(0), 1.0)
    sd = ndimage.gaussian_filter(stack.std(0, ddof=1), 1.0)
    inside = (stack != 0).any(0)
    sd = np.maximum(sd, 0.5 * float(np.median(sd[inside])) if inside.any() else 1e-6)
    return maps[0].with_array(mean.astype(np.float32)), maps[0].with_array(sd.astype(np.float32))


def registrations(ctx: Context, channels: dict[str, Volume]) -> list[sitk.Transform]:
    """Affine transforms from a case to each normative cohort subject (T1 onto T1), computed once per
    case and kept for every row that needs them."""
    key = hashlib.sha1(channels[ANCHOR].array.tobytes()).hexdigest()
    done = ctx.cache.setdefault("registrations", {})
    if key not in done:
        done[key] = [affine(channels[ANCHOR], c[ANCHOR]) for c in normative_cohort(ctx)]
    return done[key]


def normative(ctx: Context, detectors: list[Detector], two_sided: bool, registered: bool = False) -> Detector:
    """Maps z-scored per voxel against the normative cohort's maps at the same place (resampled onto
    each case's grid; `registered`: carried there through each cohort subject's affine registration to
    the case), averaged over `detectors` (e.g. one per contrast); two_sided: |z| (intensities: bright
    or dark), else max(z, 0) (residuals: only larger than normal). Zero where the maps are."""
    cohort = normative_cohort(ctx)
    cohort_maps = [[d(c)[0] for c in cohort] for d in detectors]
    stats = None if registered else [voxel_statistics(maps) for maps in cohort_maps]

    def detect(channels: dict[str, Volume]) -> tuple[Volume, float]:
        maps = [d(channels)[0] for d in detectors]
        if registered:
            moves = registrations(ctx, channels)
            case_stats = [voxel_statistics([m.with_array(carry(c.array, c, m, t)) for c, t in zip(group, moves)])
                          for m, group in zip(maps, cohort_maps)]
        else:
            case_stats = [(m.with_array(onto_grid(mean, m.geometry)), m.with_array(onto_grid(sd, m.geometry)))
                          for m, (mean, sd) in zip(maps, stats)]
        zs = []
        for m, (mean, sd) in zip(maps, case_stats):
            z = (m.array - mean.array) / sd.array
            zs.append(np.abs(z) if two_sided else np.clip(z, 0.0, None))
        inside = np.any([m.array != 0 for m in maps], axis=0)
        z = np.where(inside, np.mean(zs, axis=0), 0.0).astype(np.float32)
        return maps[0].with_array(z), top_mean(z[inside], TOP_FRACTION)
    return detect


NOT_NORMATIVE = Evaluation({}, extra={"skipped": "normative rows need healthy subjects in the test subjects' "
                                                  "space: phantom studies only"})


def _eval_tissue_atlas(ctx: Context, folder: Path) -> Evaluation:
    """`atlas.TissueAtlas` of the bundled segmenter over the normative cohort (registrations shared
    with the registered floor)."""
    if ctx.data.source.get("kind") != "phantom":
        return NOT_NORMATIVE
    inputs = read_card(resolve_model(SEGMENTER)).inputs
    atlas = TissueAtlas(SEGMENTER, [[c[ch] for ch in inputs] for c in normative_cohort(ctx)], device=str(ctx.device))

    def detect(channels: dict[str, Volume]) -> tuple[Volume, float]:
        result = atlas.detect([channels[ch] for ch in inputs], transforms=registrations(ctx, channels))
        return result.outputs["output"], result.info["score"]
    return _evaluate(ctx, detect)


def _eval_normative_diffusion(method: str, task: dict[str, Any] | None):
    """Another diffusion row's model (trained there first if that row has not run), its maps normative."""
    def evaluate(ctx: Context, folder: Path) -> Evaluation:
        if ctx.data.source.get("kind") != "phantom":
            return NOT_NORMATIVE
        shared = ctx.out / method
        if not (shared / "trained.json").is_file():
            write_json(shared / "trained.json", _fit_diffusion(task)(ctx, shared))
        evaluation = _evaluate(ctx, normative(ctx, [_model_detector(ctx, shared / "model")], False))
        evaluation.extra["training"] = json.loads((shared / "trained.json").read_text(encoding="utf-8"))
        return evaluation
    return evaluate


def _eval_normative_intensity(channels: list[str], registered: bool = False):
    def evaluate(ctx: Context, folder: Path) -> Evaluation:
        if ctx.data.source.get("kind") != "phantom":
            return NOT_NORMATIVE
        cards = [get_task(TASK).make_card(ctx.data.train, budget_recipe(ctx, RECIPE, QUICK_NETWORK, channels=[ch]))
                 for ch in channels]
        return _evaluate(ctx, normative(ctx, [_map_detector(card, _floor("raw")) for card in cards], True, registered))
    return evaluate


# ---- the supervised slice classifier (volume level) ------------------------------------------------

def _lesion_space(card: ModelCard, flair: Volume, lesion: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """A FLAIR on the model grid, normalised as the card says ((1, z, y, x)), and its lesion mask."""
    extra = [flair.with_array(lesion.astype(np.float32))] if lesion is not None else []
    space = ModelSpace.enter([flair] + extra, card.orientation, card.spacing)
    x = to_unit(space.arrays[0], robust_scale(space.arrays[0], card.normalisation))[None]
    return x, (space.arrays[1] > 0.5) if lesion is not None else np.zeros(x.shape[1:], bool)


def patch_batches(ctx: Context, card: ModelCard, batch_size: int, seed: int = 0) -> Iterator[Batch]:
    """The training subjects' acquired FLAIR as 64 x 64 crops (half centred on a lesion voxel, as the
    segmenters' oversampling does), randomly flipped; target (B, 1) = 1 if the crop holds a lesion voxel."""
    value = ctx.data.train.labels.get("lesion")
    cases = []
    for case in ctx.data.train_cases:
        if case.label is None:
            continue
        label = case.read_label()
        x, lesion = _lesion_space(card, case.read("FLAIR"),
                                  label.array == value if value is not None else lesion_reference(label))
        cases.append(TrainingCase(target=lesion[None].astype(np.float32), cond=x, foreground=brain_mask(x + 1.0),
                                  focus=[np.argwhere(lesion)]))
    gen = torch.Generator().manual_seed(seed)
    for batch in random_batches(cases, spatial_dims=2, patch=card.patch, batch_size=batch_size, seed=seed,
                                focus_fraction=0.5):
        flip = torch.rand(batch_size, generator=gen) < 0.5
        images = torch.where(flip[:, None, None, None], batch.cond.flip(-1), batch.cond)
        yield Batch((batch.target > 0.5).flatten(1).any(1, keepdim=True).float(), images)


def slice_probabilities(net: torch.nn.Module, card: ModelCard, flair: Volume, device: torch.device) -> np.ndarray:
    """Per brain-holding axial slice: the largest lesion probability of its 64 x 64 tiles (stride 32)."""
    x, _ = _lesion_space(card, flair, None)
    slices = torch.from_numpy(x[0][brain_mask(x + 1.0).any(axis=(1, 2))])[:, None]
    ph, pw = card.patch
    h, w = slices.shape[-2:]
    padded = torch.nn.functional.pad(slices, [0, max(0, pw - w) + (-max(w, pw) % (pw // 2)),
                                              0, max(0, ph - h) + (-max(h, ph) % (ph // 2))], value=-1.0)
    tiles = padded.unfold(2, ph, ph // 2).unfold(3, pw, pw // 2)           # (n, 1, ty, tx, ph, pw)
    n, _, ty, tx = tiles.shape[:4]
    with torch.inference_mode():
        logits = net(tiles.permute(0, 2, 3, 1, 4, 5).reshape(-1, 1, ph, pw).to(device))
    return torch.sigmoid(logits).reshape(n, ty * tx).amax(1).cpu().numpy()


def _fit_resnet(quick: bool):
    def fit(ctx: Context, folder: Path) -> dict[str, Any]:
        card = _card(ctx)
        spec = {"block": "basic", "layers": [1, 1, 1, 1], "n_input_channels": 1, "num_classes": 1, **RESNET[quick]}
        bce = lambda pred, batch: torch.nn.functional.binary_cross_entropy_with_logits(  # noqa: E731
            pred, batch.target.to(pred.device))
        return fit_supervised(ctx, folder, card, "resnet", spec, bce, label="resnet", train={"lr": RESNET_LR},
                              batches=patch_batches(ctx, card, ctx.budget.batch_size))
    return fit


def _eval_resnet(ctx: Context, folder: Path) -> Evaluation:
    net, _ = load_baseline(folder, ctx.device)
    card = _card(ctx)

    def detect(channels: dict[str, Volume]) -> tuple[None, float]:
        p = slice_probabilities(net, card, channels["FLAIR"], ctx.device)
        return None, float(np.mean(np.sort(p)[-TOP_SLICES:]))
    return _evaluate(ctx, detect)


def methods(quick: bool) -> list[Method]:
    return [
        Method("diffusion-simplex", "Diffusion, simplex noise (AnoDDPM)", "diffusion", _eval_diffusion,
               _fit_diffusion(None)),
        Method("diffusion-gaussian", "Diffusion, Gaussian noise", "diffusion", _eval_diffusion,
               _fit_diffusion(GAUSSIAN)),
        Method("diffusion-joint", f"Diffusion, {', '.join(JOINT)} jointly (simplex)", "diffusion", _eval_diffusion,
               _fit_diffusion({"channels": JOINT})),
        Method("diffusion-masked", f"Diffusion, {', '.join(JOINT)} jointly, 32 mm boxes redrawn from their "
               "surroundings (pDDPM-style, Gaussian)", "diffusion", _eval_diffusion, _fit_diffusion(MASKED)),
        Method("diffusion-bundled", f"Diffusion, bundled {BUNDLED} (Gaussian)", "diffusion", _eval_bundled,
               note=bundled_note(BUNDLED)),
        Method("ae", "Autoencoder reconstruction (MONAI AutoEncoder)", "learned", _eval_reconstruction,
               _fit_reconstruction("autoencoder", quick)),
        Method("vae", "VAE reconstruction (MONAI VarAutoEncoder)", "learned", _eval_reconstruction,
               _fit_reconstruction("var-autoencoder", quick)),
        Method("resnet", "Supervised ResNet-10 (MONAI ResNet), slices scored by 64 x 64 tiles", "learned", _eval_resnet,
               _fit_resnet(quick), note="volume level only"),
        Method("diffusion-gaussian-normative", "Diffusion, Gaussian noise, residual z-scored per voxel against "
               f"{NORMATIVE_SUBJECTS[quick]} healthy subjects (normative)", "diffusion",
               _eval_normative_diffusion("diffusion-gaussian", GAUSSIAN), note="the diffusion-gaussian row's model"),
        Method("diffusion-joint-normative", f"Diffusion, {', '.join(JOINT)} jointly, residual z-scored per voxel "
               f"against {NORMATIVE_SUBJECTS[quick]} healthy subjects (normative)", "diffusion",
               _eval_normative_diffusion("diffusion-joint", {"channels": JOINT}), note="the diffusion-joint row's model"),
        Method("flair", "FLAIR intensity as the map", "floor", _eval_floor("raw")),
        Method("flair-negated", "FLAIR intensity negated", "floor", _eval_floor("negated")),
        Method("flair-zscore", "FLAIR |z-score| in the brain", "floor", _eval_floor("zscore")),
        Method("flair-normative", f"FLAIR |z| per voxel against {NORMATIVE_SUBJECTS[quick]} healthy subjects "
               "(normative floor)", "floor", _eval_normative_intensity(["FLAIR"])),
        Method("joint-normative", f"{', '.join(JOINT)} |z| per voxel against {NORMATIVE_SUBJECTS[quick]} healthy "
               "subjects, averaged (normative floor)", "floor", _eval_normative_intensity(JOINT)),
        Method("diffusion-tissue-atlas", f"Diffusion segmenter (bundled {SEGMENTER}): tissue where the "
               f"{NORMATIVE_SUBJECTS[quick]} healthy subjects, registered (affine), have none", "diffusion",
               _eval_tissue_atlas, note="bundled segmenter, trained with hyperintense lesions labelled"),
        Method("joint-normative-registered", f"{', '.join(JOINT)} |z| per voxel against {NORMATIVE_SUBJECTS[quick]} "
               "healthy subjects registered (affine), averaged (normative floor)", "floor",
               _eval_normative_intensity(JOINT, registered=True)),
    ]
