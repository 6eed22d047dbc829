"""The `diffusion-mic` command line (DESIGN.md, 'Command line')."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from .errors import Cancelled, DiffusionMICError, DiffusionMICWarning
from .progress import Progress
from .volume import write_volume

TASK_NAMES = ("generate", "translate", "segment", "denoise", "anomaly")


def _progress(args: argparse.Namespace) -> Progress:
    return Progress(getattr(args, "progress", "tqdm"))


def cmd_phantom(args: argparse.Namespace) -> dict[str, Any]:
    from .phantom import write_phantom
    t0 = time.perf_counter()
    progress = _progress(args)
    progress.start("phantom", args.subjects)
    cases = write_phantom(Path(args.out), subjects=args.subjects, seed=args.seed, resolution=args.resolution,
                          noise=args.noise, lesions=args.lesions, lesion_kind=args.lesion_kind, progress=lambda done, total: progress.advance())
    progress.close()
    return {"out": str(args.out), "cases": cases, "wall_time_s": round(time.perf_counter() - t0, 2)}


def _training_settings(args: argparse.Namespace) -> dict[str, Any]:
    """--config's settings, with the command line recorded for the card and --seed applied."""
    from .engine.pipeline import load_settings
    settings = load_settings(args.config)
    settings.setdefault("command", "diffusion-mic " + " ".join(sys.argv[1:]))
    if args.seed is not None:
        settings.setdefault("train", {})["seed"] = args.seed
    return settings


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from .engine.pipeline import train
    card = train(args.task, args.data, args.out, settings=_training_settings(args), max_steps=args.max_steps,
                 device=args.device, progress=_progress(args), resume=not args.restart)
    return {"model": str(args.out), "name": card.name, "steps": card.training["steps"],
            "wall_time_s": card.training["wall_time_s"], "final_loss": card.training["final_loss"]}


def cmd_finetune(args: argparse.Namespace) -> dict[str, Any]:
    from .engine.pipeline import finetune
    card = finetune(args.task, args.model, args.data, args.out, lora_rank=args.lora_rank,
                    settings=_training_settings(args), max_steps=args.max_steps, device=args.device, progress=_progress(args), resume=not args.restart)
    tuned = card.training["finetune"]
    return {"model": str(args.out), "name": card.name, "base_model": tuned["base_model"],
            "lora_rank": tuned["lora_rank"], "trainable_parameters": tuned["trainable_parameters"],
            "steps": card.training["steps"], "wall_time_s": card.training["wall_time_s"],
            "final_loss": card.training["final_loss"]}


def cmd_adapt(args: argparse.Namespace) -> dict[str, Any]:
    from .engine.pipeline import adapt
    card = adapt(args.task, args.model, args.input, args.out, steps=args.steps, lora_rank=args.lora_rank,
                 sigma=args.sigma, device=args.device, progress=_progress(args))
    spec = card.training["self_supervised"]
    return {"model": str(args.out), "name": card.name, "base_model": card.training["finetune"]["base_model"],
            "steps": card.training["steps"], "wall_time_s": card.training["wall_time_s"],
            "sigma_unit": spec["sigma_unit"], "sigma_estimated": spec["sigma"] is None}


def _run_adapted(args: argparse.Namespace, volumes: list, options) -> Any:
    """run --adapt N: adapt the model to the one input in a temporary folder, then run that."""
    import tempfile

    from .api import run
    from .engine.pipeline import adapt
    if args.task != "denoise" or len(volumes) != 1 or args.adapt < 1:
        raise DiffusionMICError("--adapt N (N >= 1) is for denoise, with one input volume")
    with tempfile.TemporaryDirectory(prefix="diffusion-mic-adapted-") as tmp:
        card = adapt("denoise", args.model, volumes[0], Path(tmp) / "model", steps=args.adapt, device=args.device,
                     progress=_progress(args))
        result = run(args.task, Path(tmp) / "model", volumes, options, progress=_progress(args))
    result.info["adapted"] = {"steps": card.training["steps"], "wall_time_s": card.training["wall_time_s"],
                              "sigma_unit": card.training["self_supervised"]["sigma_unit"]}
    return result


def _run_atlas(args: argparse.Namespace, volumes: list) -> Any:
    """run anomaly --healthy DIR: the segmenter --model's tissue probabilities against the healthy
    subjects', each registered onto the input (DiffusionMICLib.atlas)."""
    from .atlas import TissueAtlas
    from .models import read_card, resolve_model
    card = read_card(resolve_model(args.model))
    if args.task != "anomaly" or card.task != "segment":
        raise DiffusionMICError(f"--healthy is for anomaly with a segment model as --model, got {args.task} with "
                                f"'{card.name}' ({card.task})")
    if len(volumes) != len(card.inputs):
        raise DiffusionMICError(f"'{card.name}' takes {' + '.join(card.inputs)}: give {len(card.inputs)} --input "
                                f"in that order, got {len(volumes)}")
    t0 = time.perf_counter()
    atlas = TissueAtlas.from_folder(args.model, args.healthy, device=args.device, progress=_progress(args))
    result = atlas.detect(volumes, progress=_progress(args))
    result.info.update(model=card.name, wall_time_s=round(time.perf_counter() - t0, 2))
    return result


def cmd_run(args: argparse.Namespace) -> dict[str, Any]:
    from .api import run
    from .segfile import is_seg_nrrd, write_segmentation
    from .tasks import RunOptions
    from .volume import WRITABLE, read_volume
    output = Path(args.output)
    segmentation = is_seg_nrrd(output)
    if segmentation and args.task != "segment":
        raise DiffusionMICError(f"--output '{output}': only segment writes .seg.nrrd files")
    if not segmentation and not output.name.lower().endswith(WRITABLE):
        raise DiffusionMICError(f"--output '{output}': unsupported file type (use {', '.join(WRITABLE)}"
                                f"{', .seg.nrrd' if args.task == 'segment' else ''})")
    if any(Path(p).resolve() == output.resolve() for p in args.input or []):
        raise DiffusionMICError(f"--output '{output}' is one of the inputs; choose another file")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DiffusionMICWarning)
        volumes = [read_volume(p) for p in args.input or []]
        options = RunOptions(sampler=args.sampler, steps=args.steps, seed=args.seed, device=args.device,
                             strength=args.strength, ensemble=args.ensemble, guidance=args.guidance,
                             count=args.count, condition=args.condition, batch_size=args.batch_size,
                             sigma=args.sigma, lesion_load=args.lesion_load)
        if args.healthy:
            result = _run_atlas(args, volumes)
        elif args.adapt:
            result = _run_adapted(args, volumes, options)
        else:
            result = run(args.task, args.model, volumes, options, progress=_progress(args))
    notes = [str(w.message) for w in caught if issubclass(w.category, DiffusionMICWarning)]
    for note in notes:
        print(f"diffusion-mic: warning: {note}", file=sys.stderr)
    for w in caught:      # other libraries' warnings as Python would have shown them
        if not issubclass(w.category, DiffusionMICWarning):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    paths = _output_paths(output, result.outputs, args)
    written: list[Path] = []
    try:
        for key, vol in result.outputs.items():
            if key == "output" and segmentation:
                written.append(write_segmentation(vol, paths[key], result.info["labels"]))
            else:
                written.append(write_volume(vol, paths[key]))
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise
    return {"outputs": {k: str(v) for k, v in paths.items()}, **result.info, "warnings": notes}


def _output_paths(output: Path, outputs: dict, args: argparse.Namespace) -> dict[str, Path]:
    """The main output at --output; extras (uncertainty, mask, ...) beside it unless named
    (as NRRD beside a .seg.nrrd)."""
    name = output.name
    stem, ext = (name[:-7], ".nii.gz") if name.endswith(".nii.gz") else (output.stem, output.suffix)
    if name.lower().endswith(".seg.nrrd"):
        stem, ext = name[:-9], ".nrrd"
    named = {"uncertainty": getattr(args, "uncertainty", None), "mask": getattr(args, "mask", None)}
    return {k: output if k == "output" else Path(named.get(k) or output.with_name(f"{stem}-{k}{ext}"))
            for k in outputs}


def cmd_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from .api import evaluate, evaluate_many
    from .volume import read_volume
    mask = read_volume(args.mask) if args.mask else None
    if len(args.pred) == 1 and len(args.ref) == 1:
        return evaluate(args.task, read_volume(args.pred[0]), read_volume(args.ref[0]), mask)
    # several: anomaly maps of several subjects, or generated samples against real subjects
    return evaluate_many(args.task, [read_volume(p) for p in args.pred], [read_volume(r) for r in args.ref],
                         [mask] if mask is not None else None)


def cmd_models(args: argparse.Namespace) -> Any:
    from .models import read_card, read_catalog, resolve_model
    if args.action == "list":
        return [{k: e.get(k) for k in ("name", "task", "description") if k in e} for e in read_catalog()]
    if not args.name:
        raise DiffusionMICError(f"'models {args.action}' needs a model name or folder")
    if args.action == "info":
        return read_card(resolve_model(args.name)).to_dict()
    if args.action in ("fetch", "import"):
        from .download import fetch, import_model
        if args.action == "fetch":
            return fetch(args.name, progress=args.progress)
        return import_model(args.name, args.as_name, force=args.force)
    if args.action == "evaluate":
        return _evaluate_model(args)
    from .models import load_model
    card, _ = load_model(args.name)
    return {"name": card.name, "sha256": card.sha256, "verified": True}


def _evaluate_model(args: argparse.Namespace) -> dict[str, Any]:
    """Held-out metrics of a model on a phantom data set; --write stores them in its card."""
    from .heldout import evaluate_model
    from .models import load_model, resolve_model, write_card
    if not args.data:
        raise DiffusionMICError("'models evaluate' needs --data: a held-out phantom data set (diffusion-mic phantom)")
    card, _ = load_model(args.name)     # checks the weights' hash first
    metrics = evaluate_model(args.name, args.data, progress=_progress(args), device=args.device)
    if args.write:
        card.metrics = {"heldout": metrics}
        write_card(resolve_model(args.name), card)
    return metrics


def cmd_demo(args: argparse.Namespace) -> Any:
    from .demo import main as demo_main
    return demo_main(Path(args.out), progress=_progress(args), device=args.device)


def cmd_study(args: argparse.Namespace) -> Any:
    from .study import run_study, write_report
    if args.task == "report":
        if not args.dir:
            raise DiffusionMICError("'study report' needs the study's folder: diffusion-mic study report DIR")
        return write_report(args.dir)
    if args.dir:
        raise DiffusionMICError(f"unexpected argument '{args.dir}'; the study's folder is --out")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    return run_study(args.task, data=args.data, out=args.out, quick=args.quick, methods=methods,
                     device=args.device, progress=_progress(args))


def cmd_benchmark(args: argparse.Namespace) -> Any:
    from .benchmark import main as bench_main
    return bench_main(size=args.size, steps=args.steps, batch=args.batch, repeats=args.repeats)


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" to an option's help, unless it has no default or it is a flag."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffusion-mic", description="Diffusion models for medical image computing.")
    sub = p.add_subparsers(dest="command", required=True)
    parsers = sub.add_parser

    def add_parser(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        """A subcommand whose --help shows every option's default."""
        kwargs.setdefault("description", kwargs.get("help"))
        return parsers(name, formatter_class=_DefaultsFormatter, **kwargs)

    def common(sp: argparse.ArgumentParser, device: bool = True) -> None:
        sp.add_argument("--progress", choices=("tqdm", "json", "none"), default="tqdm",
                        help="progress on stderr as a bar, as one JSON object per line on stdout, or none")
        if device:
            sp.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps")

    sp = add_parser("phantom", help="write a simulated brain MRI data set (nnU-Net v2 layout)")
    sp.add_argument("out", help="the data set folder to write")
    sp.add_argument("--subjects", type=int, default=4, help="number of simulated subjects")
    sp.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same files")
    sp.add_argument("--resolution", type=float, choices=(1.0, 2.0), default=2.0, help="voxel size in mm")
    sp.add_argument("--noise", type=float, default=3.0, help="Rician noise, percent of the brightest tissue")
    sp.add_argument("--lesions", type=int, default=3, help="lesions per subject (0: healthy)")
    sp.add_argument("--lesion-kind", choices=("hyper", "iso", "hypo", "mixed", "tumour"), default="hyper",
                    help="hyper: FLAIR-bright MS lesions; iso: grey-matter-like tissue in white matter; hypo: "
                         "T1 black holes; mixed: each lesion one of those; tumour: one mass with necrosis, "
                         "oedema and mass effect (when --lesions > 0)")
    common(sp, device=False)
    sp.set_defaults(func=cmd_phantom)

    sp = add_parser("train", help="train a task's model on a data set")
    sp.add_argument("task", choices=TASK_NAMES, help="the task the model is for")
    sp.add_argument("--data", required=True, help="data set folder (nnU-Net v2 raw or Medical Segmentation Decathlon)")
    sp.add_argument("--out", required=True, help="model folder to write (model.json + model.safetensors)")
    sp.add_argument("--config", help="JSON training settings (network, schedule, train, patch, task)")
    sp.add_argument("--max-steps", type=int, help="training steps (default: the config's, else the task's)")
    sp.add_argument("--seed", type=int, help="random seed of the training (default: the config's, else 0)")
    sp.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    common(sp)
    sp.set_defaults(func=cmd_train)

    sp = add_parser("finetune", help="fine-tune a trained model on a (small) data set, with LoRA by default")
    sp.add_argument("task", choices=TASK_NAMES, help="the task of the base model")
    sp.add_argument("--model", required=True, help="the base model: a folder or a catalog name (left unchanged)")
    sp.add_argument("--data", required=True, help="the site's data set folder, in the same layout as for train")
    sp.add_argument("--out", required=True, help="model folder to write for the fine-tuned model")
    sp.add_argument("--lora-rank", type=int, default=8, help="adapter rank; 0 fine-tunes all weights")
    sp.add_argument("--config", help="JSON settings: train (max_steps, lr, batch_size, ...), cases, name")
    sp.add_argument("--max-steps", type=int, help="fine-tuning steps (default: the config's, else 500)")
    sp.add_argument("--seed", type=int, help="random seed of the training (default: the config's, else 0)")
    sp.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    common(sp)
    sp.set_defaults(func=cmd_finetune)

    sp = add_parser("adapt", help="adapt a denoiser to one noisy scan, without a clean reference (self-supervised)")
    sp.add_argument("task", choices=("denoise",), help="the task of the base model (denoise)")
    sp.add_argument("--model", required=True, help="the base model: a folder or a catalog name (left unchanged)")
    sp.add_argument("--input", required=True, help="the noisy scan to adapt to (any readable volume)")
    sp.add_argument("--out", required=True, help="model folder to write for the adapted model")
    sp.add_argument("--steps", type=int, default=200, help="adaptation steps (Recorrupted-to-Recorrupted pairs)")
    sp.add_argument("--lora-rank", type=int, default=8, help="adapter rank; 0 adapts all weights")
    sp.add_argument("--sigma", type=float, default=None,
                    help="the scan's noise standard deviation in its units (default: estimated from the scan)")
    common(sp)
    sp.set_defaults(func=cmd_adapt)

    sp = add_parser("run", help="run a task's model on input volumes")
    sp.add_argument("task", choices=TASK_NAMES, help="the task to run")
    sp.add_argument("--model", required=True, help="catalog name or model folder")
    sp.add_argument("--input", action="append",
                    help="input volume or 2D image, a file or a DICOM folder (repeat for several modalities, in the "
                         "model's order; the others are resampled onto the first one's grid)")
    sp.add_argument("--output", required=True,
                    help="main output file (.nrrd, .nii, .nii.gz, .mha; segment also .seg.nrrd)")
    sp.add_argument("--sampler", choices=("dpm++2m", "ddim", "unipc", "ddpm"),
                    help="sampler (default: the model card's)")
    sp.add_argument("--steps", type=int, help="sampler steps (default: the model card's)")
    sp.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same result")
    sp.add_argument("--strength", type=float,
                    help="denoise, anomaly: depth of the partial diffusion in (0, 1] (default: the card's)")
    sp.add_argument("--ensemble", type=int, help="number of draws averaged (default: the card's)")
    sp.add_argument("--guidance", type=float, help="generate: classifier-free guidance scale (default: the card's)")
    sp.add_argument("--count", type=int, default=1, help="generate: number of volumes")
    sp.add_argument("--condition", help="generate: class to draw (default: unconditional)")
    sp.add_argument("--lesion-load", type=float, metavar="ML",
                    help="generate, --condition lesion with a lesion-map model: the lesion load in mL, composed of "
                         "the model's training lesions (default: one training subject's lesions)")
    sp.add_argument("--batch-size", type=int, default=16, help="slices per batch (2D models)")
    sp.add_argument("--sigma", type=float,
                    help="denoise, models conditioned on the noise level: the input's noise standard deviation in "
                         "its own units (default: estimated from the input)")
    sp.add_argument("--uncertainty", help="segment: where to write the uncertainty map (default: beside --output)")
    sp.add_argument("--mask", help="anomaly: where to write the thresholded mask (default: beside --output)")
    sp.add_argument("--healthy", metavar="DIR",
                    help="anomaly: a data set folder of healthy subjects of the input's protocol; --model is then a "
                         "segment model (e.g. brain-mri-lesion-segment) and the map is tissue where the healthy "
                         "subjects, registered onto the input, have none (DiffusionMICLib.atlas)")
    sp.add_argument("--adapt", type=int, default=0,
                    help="denoise: first adapt the model to the input for this many self-supervised steps "
                         "(a temporary copy; the model is left unchanged); 0: no adaptation")
    common(sp)
    sp.set_defaults(func=cmd_run)

    sp = add_parser("evaluate", help="metrics of a prediction against a reference (prints JSON)")
    sp.add_argument("task", choices=TASK_NAMES, help="the task whose metrics to compute")
    sp.add_argument("--pred", required=True, nargs="+", help="prediction(s); several for anomaly and generate")
    sp.add_argument("--ref", required=True, nargs="+", help="reference(s): one per --pred, or real subjects")
    sp.add_argument("--mask", help="measure only inside this mask (default: the task's choice, e.g. the foreground)")
    sp.set_defaults(func=cmd_evaluate)

    sp = add_parser("models", help="the model catalog")
    sp.add_argument("action", choices=("list", "info", "fetch", "import", "verify", "evaluate"),
                    help="list the catalog; show a card; download; import a folder or .zip; check the weights' "
                         "hash; measure held-out metrics")
    sp.add_argument("name", nargs="?", help="model name or folder; for import, a model folder or .zip")
    sp.add_argument("--name", dest="as_name", help="import: the name to store it under (default: the card's)")
    sp.add_argument("--force", action="store_true", help="import: replace a different cached model of that name")
    sp.add_argument("--data", help="evaluate: a held-out phantom data set (e.g. diffusion-mic phantom DIR --seed 9001)")
    sp.add_argument("--write", action="store_true", help="evaluate: store the metrics in the model's card")
    sp.add_argument("--device", default="auto", help="evaluate: auto (CUDA, then MPS, then CPU), cpu, cuda, mps")
    sp.add_argument("--progress", choices=("tqdm", "json", "none"), default="tqdm",
                    help="fetch, evaluate: a bar on stderr, or one JSON object per line on stdout")
    sp.set_defaults(func=cmd_models)

    sp = add_parser("demo", help="the main job: phantom subject, models, results, metrics")
    sp.add_argument("--out", default="demo-out", help="folder for the subject, results, figures and metrics")
    common(sp)
    sp.set_defaults(func=cmd_demo)

    sp = add_parser("study", help="diffusion against the traditional models on the same data and budget",
                        description="Train every method of TASK on the same cases with the same budget, evaluate "
                                    "them on the same held-out cases, and write OUT/TASK.json, .md and .png; "
                                    "'study report DIR' merges the tasks into DIR/report.md.")
    sp.add_argument("task", choices=(*TASK_NAMES, "speed", "report"),
                    help="the task to study, 'speed' (against MONAI's DDPM-1000 path), or 'report'")
    sp.add_argument("dir", nargs="?", help="report: the study's folder")
    sp.add_argument("--data", help="an nnU-Net v2 / MSD data set, split by a fixed seed "
                                   "(default: phantom subjects, training seed 100, held-out seed 9001)")
    sp.add_argument("--out", default="study", help="the study's folder")
    sp.add_argument("--quick", action="store_true", help="tiny budgets: proves the wiring, not the ranking")
    sp.add_argument("--methods", help="comma-separated method names (default: all of the task's)")
    common(sp)
    sp.set_defaults(func=cmd_study)

    sp = add_parser("benchmark", help="time UNet forward and sampling per sampler (prints a table)")
    sp.add_argument("--size", type=int, default=96, help="slice size in voxels (square)")
    sp.add_argument("--steps", type=int, default=10, help="sampler steps")
    sp.add_argument("--batch", type=int, default=8, help="slices per batch")
    sp.add_argument("--repeats", type=int, default=3, help="timed repeats per sampler (the median counts)")
    sp.set_defaults(func=cmd_benchmark)

    from .text2image.cli import add_text2image   # issue 13: Stable-Diffusion-architecture text-to-image
    add_text2image(add_parser, common)
    return p


def _terminate(signum, frame):
    raise Cancelled("cancelled by signal")


def main(argv: list[str] | None = None) -> int:
    # Idle OpenMP threads sleep instead of spinning (read when torch loads, which happens later):
    # on a busy 2-core machine spinning made training steps ~10x slower (measured in the study).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        result = args.func(args)
    except Cancelled:
        print("diffusion-mic: cancelled", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("diffusion-mic: interrupted", file=sys.stderr)
        return 130
    except (DiffusionMICError, FileNotFoundError, PermissionError) as e:
        print(f"diffusion-mic: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one clear line, not a traceback, for users
        print(f"diffusion-mic: error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
        return 1
    if result is not None:
        print(json.dumps(result, indent=None if args.command == "run" else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
