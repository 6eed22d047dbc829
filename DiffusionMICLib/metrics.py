"""Image-quality and segmentation metrics, computed with MONAI inside an optional mask."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from monai.metrics import SSIMMetric

from .engine.inference import bounding_box
from .errors import DiffusionMICError
from .volume import Volume


def _check_grid(pred: Volume, ref: Volume, mask: Volume | None) -> None:
    for name, v in (("reference", ref), ("mask", mask)):
        if v is not None and not v.geometry.same_as(pred.geometry, tol=1e-3):
            raise DiffusionMICError(f"the {name} is not on the prediction's voxel grid")


def image_metrics(pred: Volume, ref: Volume, mask: Volume | None = None) -> dict[str, Any]:
    """RMSE, NMAE, PSNR and SSIM of pred against ref, inside mask (default: everywhere).

    PSNR uses the reference's range inside the mask as peak; NMAE is the mean absolute error
    over that range; SSIM (MONAI, 3D, 7-voxel Gaussian window) is computed on the mask's
    bounding box (2D SSIM when that box is one slice thick).
    """
    _check_grid(pred, ref, mask)
    p = pred.array.astype(np.float64)
    r = ref.array.astype(np.float64)
    m = np.ones(r.shape, bool) if mask is None else mask.array > 0
    if not m.any():
        raise DiffusionMICError("the mask is empty")
    diff = p[m] - r[m]
    data_range = float(r[m].max() - r[m].min()) or 1.0
    rmse = float(np.sqrt(np.mean(diff**2)))
    box = bounding_box(m, margin=0)
    pb, rb = p[box], r[box]
    if 1 in pb.shape:     # a single slice (a 2D image as a volume): 2D SSIM over its plane
        pb, rb = pb.squeeze(), rb.squeeze()
    pt = torch.from_numpy(np.atleast_2d(pb)).float()[None, None]
    rt = torch.from_numpy(np.atleast_2d(rb)).float()[None, None]
    win = min(7, *[s for s in rt.shape[2:]])
    win = win if win % 2 else win - 1
    ssim = SSIMMetric(spatial_dims=rt.ndim - 2, data_range=data_range, win_size=max(win, 1))(pt, rt)
    return {
        "rmse": rmse,
        "nmae": float(np.mean(np.abs(diff)) / data_range),
        "psnr": float(20 * np.log10(data_range / max(rmse, 1e-12))),
        "ssim": float(ssim.mean()),
        "voxels": int(m.sum()),
    }


def segmentation_metrics(pred: Volume, ref: Volume, labels: dict[str, int]) -> dict[str, Any]:
    """Per label: Dice, IoU and 95 % Hausdorff distance in mm (MONAI), plus their means over the labels.

    `labels` maps names to values (background, value 0, is skipped). The spacing comes from the
    volumes' geometry. A label absent from both maps scores Dice = IoU = 1 and HD95 = 0; absent
    from only one, Dice = IoU = 0 and HD95 = null (infinite). Means skip nulls.
    """
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou

    _check_grid(pred, ref, None)
    p, r = np.rint(pred.array).astype(np.int64), np.rint(ref.array).astype(np.int64)
    spacing = list(pred.spacing[::-1])    # arrays are (z, y, x); geometry spacing is (x, y, z)
    per_label: dict[str, Any] = {}
    for name, value in labels.items():
        if value == 0:
            continue
        pm = torch.from_numpy(p == value)[None, None].float()
        rm = torch.from_numpy(r == value)[None, None].float()
        n_pred, n_ref = int(pm.sum()), int(rm.sum())
        if n_pred == 0 or n_ref == 0:
            both_empty = n_pred == n_ref == 0
            dice = iou = float(both_empty)
            hd95 = 0.0 if both_empty else None
        else:
            dice = float(compute_dice(pm, rm, include_background=True, ignore_empty=False))
            iou = float(compute_iou(pm, rm, include_background=True, ignore_empty=False))
            hd95 = float(compute_hausdorff_distance(pm, rm, include_background=True, percentile=95,
                                                    spacing=spacing))
        per_label[name] = {"value": int(value), "dice": dice, "iou": iou, "hd95_mm": hd95,
                           "voxels_pred": n_pred, "voxels_ref": n_ref}

    def mean(key: str) -> float | None:
        vals = [m[key] for m in per_label.values() if m[key] is not None]
        return float(np.mean(vals)) if vals else None

    return {"labels": per_label, "mean_dice": mean("dice"), "mean_iou": mean("iou"), "mean_hd95_mm": mean("hd95_mm")}


# ---- anomaly detection ------------------------------------------------------------------------

def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the precision-recall curve as average precision, sum_n (R_n - R_n-1) P_n over
    the distinct score thresholds (scikit-learn's definition, ties grouped); NaN without positives."""
    s = np.asarray(scores, np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if not y.any():
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]     # last index of each distinct score
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * tp / (tp + fp)))


def best_dice(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """The largest Dice of (scores >= t) against labels over every threshold t, and that t."""
    s = np.asarray(scores, np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if not y.any():
        return float("nan"), float("nan")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tp = np.cumsum(y)[last]
    dice = 2 * tp / ((last + 1) + y.sum())
    i = int(np.argmax(dice))
    return float(dice[i]), float(s[last[i]])


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    from monai.metrics import compute_roc_auc
    y = np.asarray(labels).ravel().astype(bool)
    if y.all() or not y.any():
        return None
    return float(compute_roc_auc(torch.from_numpy(np.asarray(scores, np.float64).ravel()),
                                 torch.from_numpy(y.astype(np.int64))))


def detection_metrics(maps: Volume | list[Volume], refs: Volume | list[Volume],
                      masks: Volume | list[Volume | None] | None = None, *, scores: list[float] | None = None,
                      score_threshold: float | None = None, top_fraction: float = 0.001) -> dict[str, Any]:
    """Anomaly maps against binary lesion references (one or several volumes, same grids pairwise).

    Voxel level, pooled over all volumes inside their masks (default: everywhere): AUROC (MONAI
    compute_roc_auc), AUPRC (average precision) and the best Dice over all thresholds (with that
    threshold). Volume level, when there are volumes with and without lesions: AUROC of the
    per-volume scores (given, else the mean of the top `top_fraction` of map values in the mask)
    and the classification error at `score_threshold` (else at the best threshold: optimistic).
    """
    maps = [maps] if isinstance(maps, Volume) else list(maps)
    refs = [refs] if isinstance(refs, Volume) else list(refs)
    if isinstance(masks, Volume) or masks is None:
        masks = [masks] * len(maps)
    if not (len(maps) == len(refs) == len(masks)) or not maps:
        raise DiffusionMICError(f"detection metrics need as many maps, references and masks "
                                f"({len(maps)}, {len(refs)}, {len(masks)})")
    values, truth, vol_scores, vol_truth = [], [], [], []
    for i, (p, r, m) in enumerate(zip(maps, refs, masks)):
        _check_grid(p, r, m)
        inside = np.ones(p.array.shape, bool) if m is None else m.array > 0
        if not inside.any():
            raise DiffusionMICError(f"the mask of volume {i + 1} is empty")
        v = p.array[inside].astype(np.float64)
        values.append(v)
        truth.append(r.array[inside] > 0)
        if scores is None:
            k = max(1, int(round(v.size * top_fraction)))
            vol_scores.append(float(np.mean(np.partition(v, v.size - k)[-k:])))
        vol_truth.append(bool((r.array > 0).any()))
    v, y = np.concatenate(values), np.concatenate(truth)
    dice, dice_threshold = best_dice(v, y)
    out: dict[str, Any] = {
        "voxel_auroc": _auroc(v, y), "voxel_auprc": average_precision(v, y) if y.any() else None,
        "best_dice": dice if y.any() else None, "best_dice_threshold": dice_threshold if y.any() else None,
        "lesion_voxels": int(y.sum()), "voxels": int(y.size), "volumes": len(maps),
        "lesion_prevalence": float(y.mean()),
    }
    vol_scores = list(scores) if scores is not None else vol_scores
    out["scores"] = vol_scores
    s, t = np.asarray(vol_scores, np.float64), np.asarray(vol_truth)
    if len(maps) > 1 and t.any() and not t.all():
        out["volume_auroc"] = _auroc(s, t)
        if score_threshold is None:
            cuts = np.r_[-np.inf, np.sort(s)]
            errors = [float(np.mean((s > c) != t)) for c in cuts]
            out["volume_error"], out["volume_threshold"] = min(errors), float(cuts[int(np.argmin(errors))])
            out["volume_threshold_chosen"] = "best"
        else:
            out["volume_error"] = float(np.mean((s > score_threshold) != t))
            out["volume_threshold"], out["volume_threshold_chosen"] = float(score_threshold), "given"
    return out


# ---- generation -------------------------------------------------------------------------------

def _array(v: Volume | np.ndarray) -> np.ndarray:
    return np.asarray(v.array if isinstance(v, Volume) else v, np.float32)


def _normalised_foreground(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The volume divided by its 99.5th Otsu-foreground percentile (as the models scale), and that foreground."""
    from .engine.space import foreground
    fg = foreground(a)
    scale = float(np.percentile(a[fg], 99.5))
    return a / (scale if scale > 0 else 1.0), fg


def _kmeans1d(v: np.ndarray, k: int = 3, iterations: int = 100, bins: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Sorted 1D k-means centres (started at evenly spaced quantiles) and the class fractions,
    computed on a fine histogram of the values (weighted k-means on the bin centres)."""
    counts, edges = np.histogram(v, bins=bins)
    x = (edges[:-1] + edges[1:]) / 2
    centres = np.quantile(v, (np.arange(k) + 0.5) / k)
    for _ in range(iterations):
        assign = np.argmin(np.abs(x[:, None] - centres[None]), axis=1)
        weight = np.bincount(assign, counts, minlength=k)
        new = np.where(weight > 0, np.bincount(assign, counts * x, minlength=k) / np.maximum(weight, 1), centres)
        if np.allclose(new, centres):
            break
        centres = new
    assign = np.argmin(np.abs(x[:, None] - centres[None]), axis=1)
    fractions = np.bincount(assign, counts, minlength=k) / counts.sum()
    order = np.argsort(centres)
    return centres[order], fractions[order]


def _pairwise_similarity(arrays: list[np.ndarray]) -> tuple[str, float | None]:
    """Mean MS-SSIM over all pairs (MONAI; as many scales as the size allows), SSIM if too small."""
    from monai.metrics import MultiScaleSSIMMetric
    if len(arrays) < 2 or len({a.shape for a in arrays}) != 1:
        return "ms-ssim", None
    smallest, kernel = min(arrays[0].shape), 5
    weights = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
    levels = next((n for n in range(5, 1, -1)
                   if smallest // (n - 1) ** 2 > kernel - 1 and smallest / 2 ** (n - 1) >= kernel), 0)
    pairs = [(i, j) for i in range(len(arrays)) for j in range(i + 1, len(arrays))]
    a = torch.stack([torch.from_numpy(arrays[i]) for i, _ in pairs])[:, None]
    b = torch.stack([torch.from_numpy(arrays[j]) for _, j in pairs])[:, None]
    if levels:
        w = np.asarray(weights[:levels]) / np.sum(weights[:levels])
        metric = MultiScaleSSIMMetric(spatial_dims=3, data_range=1.0, kernel_size=kernel, kernel_sigma=1.0,
                                      weights=tuple(w.tolist()))
        return f"ms-ssim ({levels} scales)", float(metric(a, b).mean())
    win = max(1, min(7, smallest) - (1 - min(7, smallest) % 2))
    return "ssim", float(SSIMMetric(spatial_dims=3, data_range=1.0, win_size=win)(a, b).mean())


def _features(a: np.ndarray, fg: np.ndarray, bins: int = 32) -> np.ndarray:
    """Histogram of the normalised foreground (32 bins on [0, 1.25]) + 4x4x4 mean layout of its box."""
    hist = np.histogram(np.clip(a[fg], 0, 1.25), bins=bins, range=(0, 1.25))[0] / max(1, int(fg.sum()))
    box = bounding_box(fg, margin=0)
    layout = torch.nn.functional.adaptive_avg_pool3d(torch.from_numpy(np.ascontiguousarray(a[box]))[None, None], 4)
    return np.concatenate([hist, layout.ravel().numpy() / 4.0]).astype(np.float32)


def edge_sharpness(a: np.ndarray, fg: np.ndarray, spacing: tuple[float, ...] | None = None) -> float:
    """Mean gradient magnitude (per mm, zyx spacing) inside the foreground eroded by two voxels
    (so the brain's outer edge does not count), over the median intensity there: scale-free, so
    volumes on any intensity scale compare at the same spacing."""
    from scipy import ndimage
    inner = ndimage.binary_erosion(fg, iterations=2)
    if not inner.any():
        inner = fg
    grads = np.gradient(a, *(spacing or (1.0,) * a.ndim))
    magnitude = np.sqrt(sum(g * g for g in grads))
    median = float(np.median(a[inner]))
    return float(magnitude[inner].mean() / (median if median > 0 else 1.0))


def _at_spacing(volume: Volume | np.ndarray, spacing: tuple[float, ...] | None) -> Volume | np.ndarray:
    """A finer real volume brought to the samples' voxel size (Gaussian pre-filter, then linear)."""
    if spacing is None or not isinstance(volume, Volume) or np.allclose(volume.spacing, spacing, rtol=1e-3):
        return volume
    from scipy import ndimage

    from .volume import resample_spacing
    sigma = [max(0.0, (t / s - 1.0) / 2.0) for s, t in zip(volume.spacing[::-1], spacing[::-1])]
    smooth = volume.with_array(ndimage.gaussian_filter(volume.array.astype(np.float32), sigma))
    return resample_spacing(smooth, tuple(spacing))


def generation_metrics(samples: list[Volume | np.ndarray], reals: list[Volume | np.ndarray]) -> dict[str, Any]:
    """How a set of generated volumes compares with real subjects (no downloaded networks needed).

    Every volume is divided by the 99.5th percentile of its Otsu foreground (the models' scale),
    so samples (normalised scale) and reals (scanner units) compare; grids need not match, but
    reals (Volumes) are first brought to the samples' voxel size when it differs, so that partial
    volume and noise averaging are alike.
    - intensity: the foreground's 5/25/50/75/95th percentiles (mean over volumes) and the 1D
      Wasserstein distance between the pooled sample and real foreground intensities;
    - tissues: 1D k-means (3 classes: about CSF/GM/WM) of each foreground, the mean centres and
      fractions, and the mean absolute difference of the centres (samples vs reals);
    - diversity: mean pairwise MS-SSIM among the samples (lower: more diverse) and, for scale,
      among the reals when they share a grid; SSIM where a volume is too small for MS-SSIM;
    - MMD (MONAI, linear kernel) between sample and real features: the foreground intensity
      histogram + a 4x4x4 coarse layout of the foreground box; needs at least two of each
      (the larger set is cut to the smaller's size; null otherwise);
    - sharpness: `edge_sharpness` (mean gradient magnitude inside the brain over its median),
      mean per group, and the samples' over the reals' (below 1: blurrier than real).
    """
    if not samples or not reals:
        raise DiffusionMICError("generation metrics need at least one sample and one real volume")
    spacing = samples[0].spacing if isinstance(samples[0], Volume) else None
    reals = [_at_spacing(v, spacing) for v in reals]
    prepared = {k: [_normalised_foreground(_array(v)) for v in vs]
                for k, vs in (("samples", samples), ("reals", reals))}
    out_spacing = {"spacing_mm": list(spacing) if spacing is not None else None}
    q = [5, 25, 50, 75, 95]
    out: dict[str, Any] = {"samples": len(samples), "reals": len(reals), **out_spacing}
    quant = {k: np.mean([np.percentile(a[fg], q) for a, fg in vs], axis=0) for k, vs in prepared.items()}
    out["intensity_quantiles"] = {"percentiles": q, **{k: v.tolist() for k, v in quant.items()}}
    out["quantile_mae"] = float(np.mean(np.abs(quant["samples"] - quant["reals"])))
    levels = np.linspace(0.5, 99.5, 100)
    pooled = {k: np.percentile(np.concatenate([a[fg] for a, fg in vs]), levels) for k, vs in prepared.items()}
    out["intensity_w1"] = float(np.mean(np.abs(pooled["samples"] - pooled["reals"])))
    tissues = {k: [_kmeans1d(a[fg]) for a, fg in vs] for k, vs in prepared.items()}
    centres = {k: np.mean([c for c, _ in v], axis=0) for k, v in tissues.items()}
    out["tissue_means"] = {k: v.tolist() for k, v in centres.items()}
    out["tissue_fractions"] = {k: np.mean([f for _, f in v], axis=0).tolist() for k, v in tissues.items()}
    out["tissue_mean_mae"] = float(np.mean(np.abs(centres["samples"] - centres["reals"])))
    out["foreground_fraction"] = {k: float(np.mean([fg.mean() for _, fg in vs])) for k, vs in prepared.items()}
    kind, sim = _pairwise_similarity([a for a, _ in prepared["samples"]])
    _, real_sim = _pairwise_similarity([a for a, _ in prepared["reals"]])
    out["diversity"] = {"metric": kind, "samples_pairwise": sim, "reals_pairwise": real_sim}
    n = min(len(samples), len(reals))
    if n >= 2:
        from monai.metrics import MMDMetric
        fs = torch.from_numpy(np.stack([_features(a, fg) for a, fg in prepared["samples"][:n]]))
        fr = torch.from_numpy(np.stack([_features(a, fg) for a, fg in prepared["reals"][:n]]))
        out["mmd"] = float(MMDMetric()(fs, fr))
    else:
        out["mmd"] = None
    out["mmd_features"] = "foreground intensity histogram (32 bins) + 4x4x4 layout, linear kernel"
    zyx = tuple(spacing[::-1]) if spacing is not None else None
    sharp = {k: float(np.mean([edge_sharpness(a, fg, zyx) for a, fg in vs])) for k, vs in prepared.items()}
    out["sharpness"] = {**sharp, "ratio": sharp["samples"] / sharp["reals"] if sharp["reals"] > 0 else None}
    return out


def _median_scaled_foreground(v: Volume | np.ndarray) -> np.ndarray:
    """The foreground's values divided by their median (which a few bright lesion voxels do not move)."""
    from .engine.space import foreground
    a = _array(v)
    values = a[foreground(a)]
    median = float(np.median(values))
    return values / (median if median > 0 else 1.0)


def bright_tail_fractions(groups: dict[str, list[Volume | np.ndarray]], healthy: list[Volume | np.ndarray],
                          percentile: float = 99.9) -> dict[str, Any]:
    """How often each group's volumes go brighter than healthy tissue: the fraction of each
    volume's foreground above the `percentile` of the pooled healthy foreground, every volume
    divided by its foreground median (a top-percentile scale would hide the tail), averaged per
    group. Measures whether a generator's "lesion" condition draws FLAIR hyperintensities at all
    (healthy volumes give about 1 - percentile / 100 by construction)."""
    if not healthy or not groups:
        raise DiffusionMICError("bright-tail fractions need healthy volumes and at least one group")
    first = next(v for vs in groups.values() for v in vs)
    spacing = first.spacing if isinstance(first, Volume) else None
    scaled: dict[int, np.ndarray] = {}     # once per volume: the healthy ones are often a group too

    def values(v: Volume | np.ndarray) -> np.ndarray:
        if id(v) not in scaled:
            scaled[id(v)] = _median_scaled_foreground(_at_spacing(v, spacing))
        return scaled[id(v)]

    threshold = float(np.percentile(np.concatenate([values(v) for v in healthy]), percentile))
    out: dict[str, Any] = {"percentile": percentile, "threshold": threshold}
    for name, volumes in groups.items():
        fractions = [float(np.mean(values(v) > threshold)) for v in volumes]
        out[name] = float(np.mean(fractions)) if fractions else None
    return out


def calibration_error(probabilities: np.ndarray, ref: np.ndarray, values: list[int],
                      mask: np.ndarray | None = None, bins: int = 20) -> float:
    """Expected calibration error of class probabilities (C, ...) against a label map (...) whose
    label of channel c is values[c]: MONAI's CalibrationErrorMetric (Guo et al. 2017; equal-width
    bins, one-vs-rest per class), averaged over the classes but the first (background), over the
    `mask` voxels (default: all)."""
    from monai.metrics import CalibrationErrorMetric
    if probabilities.shape[0] != len(values) or probabilities.shape[1:] != ref.shape:
        raise DiffusionMICError(f"calibration needs (C, ...) probabilities for {len(values)} labels on the "
                                f"reference's grid, got {probabilities.shape} and {ref.shape}")
    inside = np.ones(ref.shape, bool) if mask is None else mask.astype(bool)
    p = torch.from_numpy(np.ascontiguousarray(probabilities[:, inside], np.float32))[None, :, :, None]
    y = torch.from_numpy(np.stack([ref[inside] == v for v in values]).astype(np.float32))[None, :, :, None]
    metric = CalibrationErrorMetric(num_bins=bins, include_background=False, calibration_reduction="expected",
                                    metric_reduction="mean")
    metric(y_pred=p, y=y)
    return float(metric.aggregate())


def uncertainty_error_agreement(uncertainty: Volume, pred: Volume, ref: Volume,
                                mask: Volume | None = None) -> dict[str, float | None]:
    """How well an uncertainty map marks a segmentation's errors (pred != ref): the uncertainty as a
    detector of the error voxels inside `mask` (detection_metrics): AUROC, AUPRC and the Dice of the
    uncertain region (uncertainty >= t) with the error region at the best t (optimistic)."""
    errors = ref.with_array((pred.array != ref.array).astype(np.uint8))
    m = detection_metrics(uncertainty, errors, mask)
    return {"auroc": m["voxel_auroc"], "auprc": m["voxel_auprc"], "dice": m["best_dice"]}
