"""Low-rank adapters (LoRA, through peft) for fine-tuning a trained network on a small data set.

The adapters wrap every convolution and linear layer of the MONAI UNet; only they are trained.
After training they are merged back into the weights, so a fine-tuned model folder holds a
plain network of the base model's architecture and runs like any other model.
"""
from __future__ import annotations

import torch

from ..errors import DiffusionMICError

ADAPTED = (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)


def add_lora(network: torch.nn.Module, rank: int, alpha: float | None = None) -> torch.nn.Module:
    """The network with rank-`rank` adapters on its conv/linear layers; the base weights are frozen."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise DiffusionMICError("LoRA fine-tuning needs peft: pip install 'DiffusionMICLib[lora]'") from None
    if rank < 1:
        raise DiffusionMICError(f"LoRA rank must be at least 1, got {rank}")
    targets = [name for name, module in network.named_modules() if isinstance(module, ADAPTED)]
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=targets,
                        lora_dropout=0.0, bias="none")
    return get_peft_model(network, config)


def merge_lora(network: torch.nn.Module) -> torch.nn.Module:
    """The plain network with the adapters folded into its weights (no-op without adapters)."""
    return network.merge_and_unload() if hasattr(network, "merge_and_unload") else network


def parameter_counts(network: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(network.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
