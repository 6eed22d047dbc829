"""HyperNetwork: small residual MLPs on the context in front of every cross-attention's key and value
projection (one pair shared by all layers, as in the original NovelAI/AUTOMATIC1111 method).

Written here because no library has it; the attention processor below is diffusers' plain
attention with the two MLPs inserted.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import Method, freeze

WEIGHTS = "hypernetwork.safetensors"


class Residual(nn.Module):
    """x + W2 relu(W1 x); W2 starts at zero, so an untrained hypernetwork changes nothing."""

    def __init__(self, dim: int, mult: int = 2):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim * mult), nn.ReLU(), nn.Linear(dim * mult, dim))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class HyperNet(nn.Module):
    def __init__(self, dim: int, mult: int = 2):
        super().__init__()
        self.key, self.value = Residual(dim, mult), Residual(dim, mult)


class HyperAttnProcessor:
    """Cross-attention whose key and value see the context through the hypernetwork."""

    def __init__(self, hyper: HyperNet):
        self.hyper = hyper

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(self.hyper.key(context)))
        value = attn.head_to_batch_dim(attn.to_v(self.hyper.value(context)))
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], hidden_states.shape[0])
        out = attn.batch_to_head_dim(torch.bmm(attn.get_attention_scores(query, key, attention_mask), value))
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def install(pipe, hyper: HyperNet) -> None:
    """Put the hypernetwork in front of every cross-attention (attn2) of the UNet."""
    from diffusers.models.attention_processor import AttnProcessor2_0
    pipe.unet.set_attn_processor({name: HyperAttnProcessor(hyper) if ".attn2." in name else AttnProcessor2_0()
                                  for name in pipe.unet.attn_processors})


class HyperNetwork(Method):
    name = "hypernetwork"
    lr = 1e-3
    mult = 2

    def prepare(self, pipe):
        freeze(pipe)
        self.hyper = HyperNet(pipe.unet.config.cross_attention_dim, self.mult).to(pipe.unet.device)
        install(pipe, self.hyper)
        return list(self.hyper.parameters())

    def save(self, pipe, folder: Path) -> list[str]:
        from safetensors.torch import save_file
        save_file({k: v.detach().cpu().contiguous() for k, v in self.hyper.state_dict().items()}, folder / WEIGHTS)
        return [WEIGHTS]

    def card(self) -> dict[str, Any]:
        return {"multiplier": self.mult}

    @staticmethod
    def apply(pipe, folder: Path, card: dict[str, Any]) -> None:
        from safetensors.torch import load_file
        hyper = HyperNet(pipe.unet.config.cross_attention_dim, card.get("multiplier", 2))
        hyper.load_state_dict(load_file(folder / WEIGHTS))
        install(pipe, hyper.to(pipe.unet.device))
