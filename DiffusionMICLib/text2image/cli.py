"""`diffusion-mic text2image pretrain|finetune|generate|study|slices` (issue 13)."""
from __future__ import annotations

import argparse
from typing import Any, Callable

from ..errors import DiffusionMICError
from ..progress import Progress

METHOD_NAMES = "lora, dreambooth, hypernetwork, embedding"


def _progress(args: argparse.Namespace) -> Progress:
    return Progress(args.progress)


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DiffusionMICError(f"'{text}' is not a comma-separated list of numbers") from None
    if not values or min(values) < 1:
        raise DiffusionMICError(f"'{text}': sizes must be positive numbers")
    return values


def cmd_pretrain(args: argparse.Namespace) -> dict[str, Any]:
    from .train import pretrain
    return pretrain(args.data, args.out, max_steps=args.max_steps, size=args.size, resolution=args.resolution,
                    batch_size=args.batch_size, seed=args.seed, device=args.device, progress=_progress(args))


def cmd_finetune(args: argparse.Namespace) -> dict[str, Any]:
    from .finetune import finetune
    return finetune(args.base, args.data, args.method, args.out, max_steps=args.max_steps, rank=args.rank,
                    prior_images=args.prior_images, token=args.token, images=args.images, batch_size=args.batch_size,
                    seed=args.seed, base_config=args.base_config, device=args.device, progress=_progress(args))


def cmd_generate(args: argparse.Namespace) -> dict[str, Any]:
    from .generate import generate
    return generate(args.base, args.prompt, args.out, adapter=args.adapter, count=args.count, seed=args.seed,
                    steps=args.steps, guidance=args.guidance, base_config=args.base_config, device=args.device,
                    progress=_progress(args))


def cmd_study(args: argparse.Namespace) -> dict[str, Any]:
    from .study import run_study
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    return run_study(args.base, args.data, args.out, sizes=_ints(args.sizes), prompts=args.prompts,
                     heldout=args.heldout, methods=methods, max_steps=args.max_steps, count=args.count,
                     steps=args.steps, guidance=args.guidance, rank=args.rank, prior_images=args.prior_images,
                     token=args.token, seed=args.seed, device=args.device, progress=_progress(args))


def cmd_slices(args: argparse.Namespace) -> dict[str, Any]:
    from .data import write_slices
    channels = [c.strip() for c in args.channels.split(",")] if args.channels else None
    n = write_slices(args.dataset, args.out, channels=channels, resolution=args.resolution, every=args.every)
    return {"out": str(args.out), "images": n}


def add_text2image(add_parser: Callable[..., argparse.ArgumentParser],
                   common: Callable[[argparse.ArgumentParser], None]) -> None:
    """The `text2image` command group, made with the main parser's `add_parser` (its help format)."""
    group = add_parser("text2image", help="Stable-Diffusion-architecture text-to-image: pretrain, fine-tune "
                                          "(LoRA, DreamBooth, HyperNetwork, Embedding), generate, study")
    subparsers = group.add_subparsers(dest="t2i_command", required=True)

    class t2i:   # noqa: N801 - the group's subcommands, formatted like every other command
        @staticmethod
        def add_parser(name: str, **kwargs) -> argparse.ArgumentParser:
            kwargs.setdefault("description", kwargs.get("help"))
            return subparsers.add_parser(name, formatter_class=group.formatter_class, **kwargs)

    def seeded(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--seed", type=int, default=0, help="random seed (the same seed gives the same result)")
        common(sp)

    sp = t2i.add_parser("pretrain", help="train a small base from scratch on captioned images")
    sp.add_argument("--data", required=True, help="folder of images with metadata.jsonl or .txt captions")
    sp.add_argument("--out", required=True, help="the new base folder (diffusers layout)")
    sp.add_argument("--max-steps", type=int, default=2000, help="UNet + text-encoder steps (the VAE gets half as many)")
    sp.add_argument("--size", default="tiny", help="tiny or small")
    sp.add_argument("--resolution", type=int, default=32, help="image side in pixels")
    sp.add_argument("--batch-size", type=int, default=32, help="images per step")
    seeded(sp)
    sp.set_defaults(func=cmd_pretrain)

    sp = t2i.add_parser("finetune", help="fine-tune a base on captioned images (the base is never written)")
    sp.add_argument("--base", required=True, help="a diffusers folder, or a .safetensors/.ckpt file with --base-config")
    sp.add_argument("--base-config", help="a single-file base's local config folder (nothing is downloaded)")
    sp.add_argument("--data", required=True, help="folder of images with metadata.jsonl or .txt captions")
    sp.add_argument("--method", required=True, help=METHOD_NAMES)
    sp.add_argument("--out", required=True, help="the adapter folder (DreamBooth: a whole model folder)")
    sp.add_argument("--max-steps", type=int, default=400, help="fine-tuning steps")
    sp.add_argument("--rank", type=int, default=4, help="LoRA rank")
    sp.add_argument("--prior-images", type=int, default=0, help="DreamBooth: class images for prior preservation")
    sp.add_argument("--token", help="the concept's word in the captions (embedding: the learned token; "
                                    "DreamBooth: removed from the captions for the class prompts)")
    sp.add_argument("--images", type=int, help="use this many of the images (seeded draw)")
    sp.add_argument("--batch-size", type=int, default=8, help="images per step")
    seeded(sp)
    sp.set_defaults(func=cmd_finetune)

    sp = t2i.add_parser("generate", help="images for a prompt: PNG and 2D NRRD")
    sp.add_argument("--base", required=True, help="a diffusers folder, or a .safetensors/.ckpt file with --base-config")
    sp.add_argument("--base-config", help="a single-file base's local config folder (nothing is downloaded)")
    sp.add_argument("--adapter", help="a finetune output folder")
    sp.add_argument("--prompt", required=True, help="the text to draw")
    sp.add_argument("--count", type=int, default=1, help="images to generate (seeds seed, seed + 1, ...)")
    sp.add_argument("--steps", type=int, default=20, help="DPM-Solver++ 2M steps")
    sp.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    sp.add_argument("--out", required=True, help="a new (or empty) folder")
    seeded(sp)
    sp.set_defaults(func=cmd_generate)

    sp = t2i.add_parser("study", help="the survey's fine-tuning study: every method, size and prompt")
    sp.add_argument("--base", required=True, help="the base every method starts from (never written)")
    sp.add_argument("--data", required=True, help="the fine-tuning images (the concept the base never saw)")
    sp.add_argument("--heldout", help="held-out real images (default: the last 15 %% of --data)")
    sp.add_argument("--sizes", default="100,500,1000", help="comma-separated numbers of fine-tuning images")
    sp.add_argument("--prompts", nargs="+", required=True, help="captions of held-out images")
    sp.add_argument("--methods", help=f"comma-separated (default all: {METHOD_NAMES})")
    sp.add_argument("--out", required=True, help="the study's folder (table, figure, results)")
    sp.add_argument("--max-steps", type=int, default=200, help="fine-tuning steps per run")
    sp.add_argument("--count", type=int, default=16, help="images generated per prompt")
    sp.add_argument("--steps", type=int, default=20, help="DPM-Solver++ 2M steps per image")
    sp.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    sp.add_argument("--rank", type=int, default=4, help="LoRA rank")
    sp.add_argument("--prior-images", type=int, default=32, help="DreamBooth: class images for prior preservation")
    sp.add_argument("--token", help="the concept's word in the captions (embedding, DreamBooth)")
    seeded(sp)
    sp.set_defaults(func=cmd_study)

    sp = t2i.add_parser("slices", help="captioned axial PNG slices of an nnU-Net/MSD data set")
    sp.add_argument("dataset", help="an nnU-Net v2 / MSD data set")
    sp.add_argument("out", help="the folder for the PNG slices and metadata.jsonl")
    sp.add_argument("--channels", help="comma-separated channel names (default: all)")
    sp.add_argument("--resolution", type=int, default=32, help="image side in pixels")
    sp.add_argument("--every", type=int, default=2, help="every n-th axial slice")
    sp.add_argument("--progress", choices=("tqdm", "json", "none"), default="tqdm", help="progress on stderr as a bar, as JSON lines on stdout, or none")
    sp.set_defaults(func=cmd_slices)
