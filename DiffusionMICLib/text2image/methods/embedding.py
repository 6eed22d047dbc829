"""Embedding (textual inversion): one token's input embedding is learned, everything else stays frozen.

The token is the concept's word in the captions. A word that the tokenizer already has as one
token keeps its id and only that row is trained; another word is added as a new token. The
loop is written here (diffusers has loading, not training): after every step all other rows
are put back, so only the token's row can change.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...errors import DiffusionMICError
from .base import Method, freeze

WEIGHTS = "learned_embeds.safetensors"


def token_id(pipe, token: str, add: bool) -> int:
    ids = pipe.tokenizer(token, add_special_tokens=False).input_ids
    if len(ids) == 1:
        return ids[0]
    if not add:
        raise DiffusionMICError(f"token '{token}' is not in this base's tokenizer")
    pipe.tokenizer.add_tokens([token])
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
    return pipe.tokenizer.convert_tokens_to_ids(token)


class Embedding(Method):
    name = "embedding"
    lr = 5e-3
    trains_text = True

    def prepare(self, pipe):
        if not self.token:
            raise DiffusionMICError("the embedding method needs --token: the concept's word in the captions")
        freeze(pipe)
        self.id = token_id(pipe, self.token, add=True)
        weight = pipe.text_encoder.get_input_embeddings().weight
        self.original = weight.detach().clone()
        weight.requires_grad_(True)
        return [weight]

    def after_step(self, pipe) -> None:
        with torch.no_grad():
            weight = pipe.text_encoder.get_input_embeddings().weight
            keep = torch.ones(len(weight), dtype=torch.bool)
            keep[self.id] = False
            weight[keep] = self.original[keep]

    def save(self, pipe, folder: Path) -> list[str]:
        from safetensors.torch import save_file
        row = pipe.text_encoder.get_input_embeddings().weight[self.id].detach().cpu().clone()
        save_file({self.token: row}, folder / WEIGHTS)
        return [WEIGHTS]

    def card(self) -> dict[str, Any]:
        return {"token": self.token, "token_id": self.id}

    @staticmethod
    def apply(pipe, folder: Path, card: dict[str, Any]) -> None:
        from safetensors.torch import load_file
        token = card["token"]
        row = load_file(folder / WEIGHTS)[token]
        i = token_id(pipe, token, add=True)
        with torch.no_grad():
            pipe.text_encoder.get_input_embeddings().weight[i] = row.to(pipe.text_encoder.device)
