"""The real nnU-Net (nnunetv2 from PyPI) as a segmentation-study row: its own fingerprint,
planning, preprocessing, 2D configuration, trainer and sliding-window predictor, with the study's
budget (the same optimiser steps of the same batch size as every learned row).

nnunetv2 is an optional study dependency (`make nnunet`): it is installed without
dynamic-network-architectures' `timm` requirement, which pulls a torchvision that fails beside the
CPU torch; the plain-convolution UNet that nnU-Net plans never imports timm. nnU-Net reads its
folders from environment variables when imported and starts its own worker processes, so each
stage runs in a child process (`python -m DiffusionMICLib.study.nnunet STAGE FOLDER`).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DiffusionMICError
from ..volume import Volume

DATASET_ID = 901
DATASET = f"Dataset{DATASET_ID}_Study"
CONFIGURATION = "2d"                    # the study's other rows are 2D networks too
TRAINER_FOLDER = f"nnUNetTrainer__nnUNetPlans__{CONFIGURATION}"
FOLD = "all"                            # train on every training subject, as the other rows do
EPOCH_ITERATIONS = 250                  # nnU-Net's iterations per epoch
VALIDATION_ITERATIONS = 5               # nnU-Net's per-epoch pseudo-Dice monitor (50 by default); no effect on training
AUGMENTATION_WORKERS = 1                # nnU-Net's data-augmentation processes beside the trainer (2 cores here)


def available() -> str | None:
    """None if nnunetv2 can run here, else why not (one line)."""
    if importlib.util.find_spec("nnunetv2") is None:
        return "nnunetv2 is not installed (make nnunet)"
    return None


def environment(folder: Path, workers: int) -> dict[str, str]:
    """nnU-Net's folders under `folder`, its data-augmentation worker count, no torch.compile."""
    env = dict(os.environ)
    env.update({"nnUNet_raw": str(folder / "raw"), "nnUNet_preprocessed": str(folder / "preprocessed"),
                "nnUNet_results": str(folder / "results"), "nnUNet_n_proc_DA": str(workers),
                "nnUNet_compile": "false"})
    return env


def label_order(labels: dict[str, int]) -> dict[str, int]:
    """A data set's labels by value: nnU-Net's label i is the i-th of them."""
    return dict(sorted(labels.items(), key=lambda kv: kv[1]))


def write_raw(folder: Path, cases: list[tuple[str, list[Volume], Volume | None]], channels: list[str],
              labels: dict[str, int], part: str = "Tr") -> None:
    """nnU-Net's raw layout: images{part}/{id}_{c:04d}.nii.gz, labels{part}/{id}.nii.gz and dataset.json.
    Label values are mapped to 0..K-1 in `labels`' order (nnU-Net wants consecutive labels)."""
    import SimpleITK as sitk
    root = folder / "raw" / DATASET
    (root / f"images{part}").mkdir(parents=True, exist_ok=True)
    order = label_order(labels)
    lut = {value: i for i, value in enumerate(order.values())}
    for case_id, volumes, label in cases:
        for c, v in enumerate(volumes):
            sitk.WriteImage(v.to_sitk(), str(root / f"images{part}" / f"{case_id}_{c:04d}.nii.gz"))
        if label is not None:
            (root / f"labels{part}").mkdir(parents=True, exist_ok=True)
            mapped = np.zeros(label.array.shape, np.uint8)
            for value, i in lut.items():
                mapped[np.rint(label.array) == value] = i
            sitk.WriteImage(label.with_array(mapped).to_sitk(), str(root / f"labels{part}" / f"{case_id}.nii.gz"))
    if part == "Tr":
        meta = {"channel_names": {str(i): name for i, name in enumerate(channels)},
                "labels": {name: i for i, name in enumerate(order)},
                "numTraining": len(cases), "file_ending": ".nii.gz", "values": list(order.values())}
        (root / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def schedule(steps: int) -> tuple[int, int]:
    """(iterations per epoch, epochs): epochs of at most nnU-Net's 250 iterations, as even as can be,
    giving `steps` optimiser steps (a few more where `steps` does not divide evenly)."""
    epochs = math.ceil(steps / EPOCH_ITERATIONS)
    return math.ceil(steps / epochs), epochs


def run_stage(stage: str, folder: Path, config: dict[str, Any]) -> None:
    """Run one stage (train | predict) in a child process; its output goes to folder/STAGE.log."""
    (folder / "config.json").write_text(json.dumps(config) + "\n", encoding="utf-8")
    log = folder / f"{stage}.log"
    with open(log, "a", encoding="utf-8") as out:
        done = subprocess.run([sys.executable, "-m", "DiffusionMICLib.study.nnunet", stage, str(folder)],
                              env=environment(folder, AUGMENTATION_WORKERS), stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
        raise DiffusionMICError(f"nnU-Net {stage} failed (exit {done.returncode}; see {log}): {' '.join(tail)}")


# ---- the child process's stages ----------------------------------------------------------------------

def _plan_and_preprocess(batch_size: int) -> dict[str, Any]:
    """nnU-Net's fingerprint and experiment planning, the 2D configuration's batch set to the study's,
    then its preprocessing (skipped where already done)."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset,
                                                                       plan_experiments, preprocess)
    from nnunetv2.paths import nnUNet_preprocessed
    base = Path(nnUNet_preprocessed) / DATASET
    plans_file = base / "nnUNetPlans.json"
    if not plans_file.is_file():
        extract_fingerprint_dataset(DATASET_ID, _fingerprint_extractor(), num_processes=1,
                                    check_dataset_integrity=True, show_progress_bar=False)
        plan_experiments([DATASET_ID])
        plans = json.loads(plans_file.read_text())
        plans["configurations"][CONFIGURATION]["batch_size"] = batch_size
        plans_file.write_text(json.dumps(plans, indent=2))
    if not (base / "done_preprocessing").is_file():
        preprocess([DATASET_ID], configurations=(CONFIGURATION,), num_processes=(1,))
        (base / "done_preprocessing").write_text("")
    return json.loads(plans_file.read_text())


def _fingerprint_extractor() -> type:
    """nnU-Net's fingerprint extractor; without CT channels, one that samples 10^6 foreground
    intensities instead of its 10^8. Those samples only set CT normalisation (MR channels are z-scored
    per image and do not read them); the 10^8, pickled back from its worker, took
    about 70 s of every run here whatever the number of cases."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization
    from nnunetv2.preprocessing.normalization.map_channel_name_to_normalization import get_normalization_scheme

    class MRFingerprintExtractor(DatasetFingerprintExtractor):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.num_foreground_voxels_for_intensitystats = 1e6

    from nnunetv2.paths import nnUNet_raw
    names = json.loads((Path(nnUNet_raw) / DATASET / "dataset.json").read_text(encoding="utf-8"))["channel_names"].values()
    if any(issubclass(get_normalization_scheme(n), CTNormalization) for n in names):
        return DatasetFingerprintExtractor
    return MRFingerprintExtractor


def _train(folder: Path, config: dict[str, Any]) -> None:
    """nnU-Net's own trainer (resumed from its latest checkpoint by nnU-Net's own `--c` logic)."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint
    torch.manual_seed(config.get("seed", 0))
    plans = _plan_and_preprocess(config["batch_size"])
    trainer = get_trainer_from_args(DATASET, CONFIGURATION, FOLD, continue_training=True,
                                    device=torch.device(config["device"]))
    trainer.num_iterations_per_epoch, trainer.num_epochs = schedule(config["steps"])
    trainer.num_val_iterations_per_epoch = VALIDATION_ITERATIONS
    trainer.save_every = 1                  # resumable after every epoch
    maybe_load_checkpoint(trainer, True, False)
    t0 = time.perf_counter()
    trainer.run_training()
    spent = time.perf_counter() - t0
    done = folder / "train_done.json"
    previous = json.loads(done.read_text())["wall_time_s"] if done.is_file() else 0.0
    conf = plans["configurations"][CONFIGURATION]
    done.write_text(json.dumps({
        "steps": trainer.num_iterations_per_epoch * trainer.num_epochs, "batch_size": conf["batch_size"],
        "wall_time_s": previous + spent, "patch_size": conf["patch_size"],
        "features_per_stage": conf["architecture"]["arch_kwargs"]["features_per_stage"]}) + "\n")


def _predict(folder: Path, config: dict[str, Any]) -> None:
    """Every imagesTs case by nnU-Net's predictor (Gaussian sliding windows, mirroring); writes
    predictions/{id}.npz with the label map, class probabilities and seconds."""
    import torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.paths import nnUNet_raw, nnUNet_results
    torch.set_num_threads(config.get("threads", torch.get_num_threads()))
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=False, device=torch.device(config["device"]),
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(Path(nnUNet_results) / DATASET / TRAINER_FOLDER),
                                                   use_folds=(FOLD,), checkpoint_name="checkpoint_final.pth")
    images = Path(nnUNet_raw) / DATASET / "imagesTs"
    out = folder / "predictions"
    out.mkdir(exist_ok=True)
    for case_id in config["cases"]:
        files = sorted(str(p) for p in images.glob(f"{case_id}_[0-9][0-9][0-9][0-9].nii.gz"))
        t0 = time.perf_counter()
        data, props = SimpleITKIO().read_images(files)
        seg, probs = predictor.predict_single_npy_array(data, props, None, None, True)
        seconds = time.perf_counter() - t0
        np.savez_compressed(out / f"{case_id}.npz", labels=seg.astype(np.uint8),
                            probabilities=probs.astype(np.float32), seconds=seconds)


def main(argv: list[str] | None = None) -> int:
    stage, folder = (argv if argv is not None else sys.argv[1:])[:2]
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    {"train": _train, "predict": _predict}[stage](folder, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
