"""Stable-Diffusion-architecture bases: build a small one from a config, save it, load any SD 1.x/2.x
checkpoint on disk (a diffusers folder, or one .safetensors/.ckpt file with a local config folder).

Nothing is downloaded: every load passes ``local_files_only=True`` and a base that would need the
Hub is refused with one line.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import DiffusionMICError
from ..models import sha256_file
from .tokenizer import MAX_LENGTH, clip_tokenizer

CARD = "text2image.json"
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
# Widths of the config-built bases: (VAE channels, UNet channels, text width, text layers).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"vae": (16, 32), "unet": (32, 64), "text": 32, "text_layers": 2, "heads": 4},
    "small": {"vae": (32, 64), "unet": (64, 128), "text": 64, "text_layers": 3, "heads": 8},
}


def quiet_libraries() -> None:
    """No loading bars or import notices from transformers and diffusers: errors stay one line."""
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from diffusers.utils import logging as diffusers_logging
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()


def build_base(size: str = "tiny", resolution: int = 32, seed: int = 0):
    """A randomly initialised StableDiffusionPipeline of the given width (VAE downsamples by 2)."""
    quiet_libraries()
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    if size not in SIZES:
        raise DiffusionMICError(f"unknown base size '{size}' (choose {', '.join(SIZES)})")
    if resolution % 8:
        raise DiffusionMICError(f"--resolution {resolution} is not a multiple of 8")
    s = SIZES[size]
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=s["vae"],
                        down_block_types=("DownEncoderBlock2D",) * len(s["vae"]),
                        up_block_types=("UpDecoderBlock2D",) * len(s["vae"]), layers_per_block=1,
                        norm_num_groups=8, sample_size=resolution)
    latent = resolution // 2 ** (len(s["vae"]) - 1)
    unet = UNet2DConditionModel(sample_size=latent, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=s["unet"], norm_num_groups=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=s["text"], attention_head_dim=s["heads"])
    tokenizer = clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=s["text"],
                                                intermediate_size=2 * s["text"], num_hidden_layers=s["text_layers"],
                                                num_attention_heads=2, max_position_embeddings=MAX_LENGTH,
                                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def save_base(pipe, out: str | Path, card: dict[str, Any]) -> Path:
    """Write a diffusers folder (safetensors weights) + card, via a temporary folder renamed at the end."""
    out = Path(out)
    if out.exists():
        raise DiffusionMICError(f"'{out}' exists already; choose a new folder")
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / CARD).write_text(json.dumps(card, indent=2), encoding="utf-8")
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def base_sha256(path: str | Path) -> str:
    """SHA-256 of a single-file checkpoint, or of a folder's (relative path, file SHA-256) list."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.name != CARD):
        h.update(f"{f.relative_to(path).as_posix()} {sha256_file(f)}\n".encode())
    return h.hexdigest()


def check_base(base: str | Path, config: str | Path | None = None) -> None:
    """Refuse, with one line, a base that is missing, incomplete, or would need a download."""
    base = Path(base)
    if not base.exists():
        raise DiffusionMICError(f"base '{base}' does not exist")
    if base.is_file():
        if base.suffix not in SINGLE_FILE_SUFFIXES:
            raise DiffusionMICError(f"base '{base}' is neither a diffusers folder nor a .safetensors/.ckpt checkpoint")
        if config is None:
            raise DiffusionMICError(f"single-file checkpoint '{base.name}' needs a local config folder "
                                    "(--base-config DIR: a Stable Diffusion diffusers folder's configs); nothing is downloaded")
        _check_folder(Path(config), weights=False)
        return
    _check_folder(base, weights=True)


def _check_folder(folder: Path, weights: bool) -> None:
    index = folder / "model_index.json"
    if not index.is_file():
        raise DiffusionMICError(f"'{folder}' is not a diffusers Stable Diffusion folder: model_index.json is missing")
    for name in COMPONENTS:
        sub = folder / name
        configs = list(sub.glob("*config.json")) + list(sub.glob("vocab.json")) + list(sub.glob("tokenizer.json"))
        if not configs:
            raise DiffusionMICError(f"base '{folder}' is incomplete: '{name}/' has no config")
        if weights and name in ("unet", "vae", "text_encoder") and not any(
                p.suffix in (".safetensors", ".bin") for p in sub.iterdir()):
            raise DiffusionMICError(f"base '{folder}' is incomplete: '{name}/' has no weights")


def load_base(base: str | Path, config: str | Path | None = None, device: str = "cpu"):
    """The StableDiffusionPipeline of a base on disk (float32, no safety checker, no download)."""
    quiet_libraries()
    from diffusers import StableDiffusionPipeline
    check_base(base, config)
    kwargs = dict(safety_checker=None, requires_safety_checker=False, local_files_only=True, dtype=torch.float32)
    try:
        if Path(base).is_file():
            pipe = StableDiffusionPipeline.from_single_file(str(base), config=str(config), **kwargs)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(str(base), use_safetensors=True, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise DiffusionMICError(f"cannot load base '{base}': {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def resolve_device(device: str = "auto") -> str:
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"
