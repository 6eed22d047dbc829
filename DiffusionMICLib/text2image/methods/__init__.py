"""The four fine-tuning methods of the survey's study; each says what it trains, saves and loads."""
from __future__ import annotations

from ...errors import DiffusionMICError
from .base import Method
from .dreambooth import DreamBooth
from .embedding import Embedding
from .hypernetwork import HyperNetwork
from .lora import LoRA

METHODS: dict[str, type[Method]] = {m.name: m for m in (LoRA, DreamBooth, HyperNetwork, Embedding)}


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise DiffusionMICError(f"unknown method '{name}' (choose {', '.join(METHODS)})")
    return METHODS[name]
